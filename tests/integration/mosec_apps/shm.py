"""Mosec's shared-memory IPC service: `python shm.py redis` or `python shm.py plasma`,
a batching stage making arrays that a two-process stage turns into lists. Also Mosec's
examples/redis_shm_ipc.py: the launcher starts redis-server and watches it with
register_daemon."""

import os
import subprocess
import sys
from typing import Any, Dict, List

import numpy as np

from natserve import Server, Worker
from natserve.errors import ValidationError
from natserve.mixin import PlasmaShmIPCMixin, RedisShmIPCMixin


class RedisRandom(RedisShmIPCMixin, Worker):
    def forward(self, batch: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        try:
            return [{"x": np.random.rand(int(req["size"]))} for req in batch]
        except KeyError as err:
            raise ValidationError(err) from err


class RedisToList(RedisShmIPCMixin, Worker):
    def forward(self, data: Dict[str, Any]) -> Dict[str, Any]:
        if not isinstance(data["x"], np.ndarray):
            raise TypeError(f"expected an array, got {type(data['x'])}")
        return {"x": data["x"].tolist()}


class PlasmaRandom(PlasmaShmIPCMixin, Worker):
    def forward(self, data: Any) -> Any:
        return data


if __name__ == "__main__":
    server = Server()
    if sys.argv[1] == "plasma":
        server.append_worker(PlasmaRandom, max_batch_size=8)
    else:
        port = os.environ["REDIS_PORT"]
        redis = subprocess.Popen(
            ["redis-server", "--port", port, "--bind", "127.0.0.1", "--save", ""],
            stdout=subprocess.DEVNULL,
        )
        RedisRandom.set_redis_url(f"redis://127.0.0.1:{port}/0")
        server.register_daemon("redis-server", redis)
        server.append_worker(RedisRandom, max_batch_size=8)
        server.append_worker(RedisToList, num=2)
        try:
            server.run()
        finally:
            redis.terminate()
            redis.wait()
