"""Pure analysis: no processes, sockets, HTTP or cluster I/O is imported here."""
