"""The asyncio Protocol echo of asyncio_echo.py, on uvloop's loop (libuv).

Run with --port P (0: the kernel picks); prints "ready TCPPORT UDPPORT".
"""

import uvloop
from asyncio_echo import main

if __name__ == "__main__":
    main(loop_factory=uvloop.new_event_loop)
