"""Mosec's timeout service: the script parses flags of its own (so it runs with
NATSERVE_SCRIPT_FLAGS naming them), and the forward timeout is seconds, a float."""

import argparse
import os
import time
from typing import Any

from natserve import Runtime, Server, Worker


class Sleepy(Worker):
    def forward(self, data: Any) -> Any:
        time.sleep(float(os.environ["SLEEP_S"]))
        return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sleep-duration", type=float, required=True)
    parser.add_argument("--worker-timeout", type=float, required=True)
    parser.add_argument("--runtime", action="store_true")
    args, _ = parser.parse_known_args()
    env = [{"SLEEP_S": str(args.sleep_duration)}]
    server = Server()
    if args.runtime:
        server.register_runtime(
            {"/inference": [Runtime(Sleepy, timeout=args.worker_timeout, env=env)]}
        )
    else:
        server.append_worker(Sleepy, timeout=args.worker_timeout, env=env)
    server.run()
