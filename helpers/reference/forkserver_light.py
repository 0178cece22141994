"""The fork server's light client as a script (see `forkserver_client.py`).

    python -S /path/to/helpers/reference/forkserver_light.py --config FILE

A script is compiled on every run, a module is not (its bytecode is cached): this stub imports
the client as a module from its own directory (`sys.path[0]`), without the `helpers` package.
"""

import sys

from forkserver_client import exec_plain, run  # type: ignore[import-not-found]  # sibling

run([a for a in sys.argv[1:] if a != "--fork-server"], exec_plain)
