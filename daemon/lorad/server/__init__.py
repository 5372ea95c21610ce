"""The daemon: the gRPC server and its listeners and token (``daemon``), the thin servicers
(``servicers``), the domain API they call (``service``), proto conversion (``proto_convert``), the
one table of exception types to status codes (``status_codes``) and the daemon's settings."""
