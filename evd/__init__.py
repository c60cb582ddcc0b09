"""evd: the classic small network services and a framed request port, on one
hand-written event loop."""

__version__ = "0.1.0"
