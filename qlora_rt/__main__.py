import os
import sys

from qlora_rt.cli import main

code = main()
if code and int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # a torchrun worker that stopped on an error has said why and left its process group; its peers are
    # stopping too, and C++ teardown racing theirs can abort (exit -6) over the clear exit code: skip it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
