"""A stand-in for a natserve Python worker, stdlib only: connects to NATSERVE_SOCKET,
sends READY, then answers every BATCH with RESULTS that echo its items (status ok).
docs/protocol.md specifies the frames. With FAKE_PID_DIR set, it leaves a file named
after its pid there, so a test can find and kill it. With FAKE_CRASH_ON set, a batch
holding an item equal to it kills the process (exit 3) instead of answering; with
FAKE_BATCH_LOG set, each batch's items are appended there as one line first; with
FAKE_SLEEP_MS set, each batch takes that long."""

import os
import socket
import struct
import sys
import time

KIND_READY, KIND_BATCH, KIND_RESULTS = 1, 2, 3


def read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            sys.exit(0)  # the agent went away
        data += chunk
    return data


def send(sock: socket.socket, kind: int, body: bytes) -> None:
    sock.sendall(struct.pack(">IB", len(body) + 1, kind) + body)


def main() -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.environ["NATSERVE_SOCKET"])
    pid_dir = os.environ.get("FAKE_PID_DIR")
    if pid_dir:
        open(os.path.join(pid_dir, str(os.getpid())), "w").close()
    send(sock, KIND_READY, struct.pack(">I", os.getpid()))
    while True:
        (length,) = struct.unpack(">I", read_exact(sock, 4))
        frame = read_exact(sock, length)
        assert frame[0] == KIND_BATCH, frame[0]
        batch_id, count = struct.unpack(">QI", frame[1:13])
        offset, items = 13, []
        for _ in range(count):
            (n,) = struct.unpack(">I", frame[offset : offset + 4])
            items.append(frame[offset + 4 : offset + 4 + n])
            offset += 4 + n
        batch_log = os.environ.get("FAKE_BATCH_LOG")
        if batch_log:
            with open(batch_log, "a") as f:
                f.write(" ".join(i.decode(errors="replace") for i in items) + "\n")
        time.sleep(int(os.environ.get("FAKE_SLEEP_MS", "0")) / 1000)
        crash_on = os.environ.get("FAKE_CRASH_ON")
        if crash_on and crash_on.encode() in items:
            os._exit(3)
        body = struct.pack(">QI", batch_id, count)
        body += b"".join(struct.pack(">BI", 0, len(item)) + item for item in items)
        send(sock, KIND_RESULTS, body)


if __name__ == "__main__":
    main()
