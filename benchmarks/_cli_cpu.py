"""`vision-steer ARGS` (`cli.main`) that appends this process's CPU seconds to the file `$CPU_LOG`:
`import_cpu_s` (interpreter start-up and imports) and `main_cpu_s` (the command: model load and work).
Used by `distributed.py` under torchrun (one line per rank) and in one process."""

import json
import os
import sys
import time

from sae_lens_vision_steer.cli import main

if __name__ == "__main__":
    c0, t0 = time.process_time(), time.perf_counter()
    rc = main(sys.argv[1:])
    with open(os.environ["CPU_LOG"], "a") as f:
        f.write(json.dumps({"rank": int(os.environ.get("RANK", 0)), "import_cpu_s": c0,
                            "main_cpu_s": time.process_time() - c0, "main_wall_s": time.perf_counter() - t0}) + "\n")
    sys.exit(rc)
