"""``python -m handler.server [--host H] [--port P]``: the self-hosted HTTP service
(handler/adapters/http/)."""

import sys

from handler.adapters.http.main import main

if __name__ == "__main__":
    sys.exit(main())
