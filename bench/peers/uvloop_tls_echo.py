"""The asyncio Protocol TLS echo of asyncio_tls_echo.py on uvloop's loop
(libuv, and uvloop's own Cython sslproto).

Run with --port P --cert F --key F; prints "ready TCPPORT 0".
"""

import uvloop
from asyncio_tls_echo import main

if __name__ == "__main__":
    main(loop_factory=uvloop.new_event_loop)
