"""Example: calculate the exponential of a number (Mosec's classic example).

python examples/exp.py
curl -X POST localhost:8000/inference -d '{"x": 2}'    # {"y": 7.38905609893065}
"""

from __future__ import annotations

import math

from natserve import Server, Worker, get_logger
from natserve.errors import ValidationError

logger = get_logger()


class CalculateExp(Worker):
    """Returns e to the power of x."""

    def forward(self, req: dict) -> dict:  # type: ignore[type-arg]
        try:
            x = float(req["x"])
        except KeyError as err:
            raise ValidationError("cannot find key 'x'") from err
        except (TypeError, ValueError) as err:
            raise ValidationError("cannot convert 'x' value to float") from err
        y = math.exp(x)
        logger.debug("x=%f, y=%f", x, y)
        return {"y": y}


if __name__ == "__main__":
    server = Server()
    server.append_worker(CalculateExp, num=2)
    server.run()
