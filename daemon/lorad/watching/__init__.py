"""Watch folders: images dropped into a watched folder are captioned and trained on by the daemon.

``file_rules`` says which files count, ``debounce`` decides when a folder has settled (pure logic),
``observer`` records file events (watchdog), ``records`` holds a watch's plain values, ``store``
persists watches beside the jobs, and ``manager`` turns settled folders into captioned, coalesced,
versioned training jobs.
"""
