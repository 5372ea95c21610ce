"""Speed benchmarks for lorad (run with ``just bench``); not part of the installed package."""
