"""Mosec's numbin service: an array made by one stage, summed by a batching one."""

from typing import Any, Dict, List

import numpy as np

from natserve import Server, Worker
from natserve.mixin import NumBinIPCMixin


class MakeArray(NumBinIPCMixin, Worker):
    def forward(self, req: Dict[str, Any]) -> Any:
        size = int(req.get("num", 10))
        return np.full(size, 1 / size)


class CheckSum(NumBinIPCMixin, Worker):
    def forward(self, arrays: List[Any]) -> List[str]:
        return ["equal" if np.isclose(a.sum(), 1) else "unequal" for a in arrays]


if __name__ == "__main__":
    server = Server()
    server.append_worker(MakeArray)
    server.append_worker(CheckSum, max_batch_size=8)
    server.run()
