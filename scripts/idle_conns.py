"""Opens many authenticated, idle client connections to a redcloak proxy and
reports what they cost it. Run by scripts/idle-conns.sh, which starts Redis
and the proxy and raises the open-files limit first.

    idle_conns.py --port P --password PW --count N --proxy-pid PID --redis-port R
"""

import argparse
import asyncio
import os
import socket
import sys
import time

# Connections being opened and authenticated at once: well under the
# listener's accept backlog, so that no SYN is dropped and retried later.
IN_FLIGHT = 256
GOAL_MIB = 200
IDLE_SECS = 2.0
TIMEOUT_SECS = 30


def command(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def proc_status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def redis_connected_clients(port: int) -> int:
    """INFO clients over a connection of our own, which it counts too."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(command(b"INFO", b"clients"))
        data = b""
        while b"connected_clients:" not in data or not data.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    for line in data.decode().splitlines():
        if line.startswith("connected_clients:"):
            return int(line.split(":")[1])
    raise RuntimeError("INFO clients had no connected_clients")


async def open_authenticated(port, password, gate):
    async with gate:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), TIMEOUT_SECS)
        writer.write(command(b"AUTH", password))
        reply = await asyncio.wait_for(reader.readline(), TIMEOUT_SECS)
        if reply != b"+OK\r\n":
            writer.close()
            raise RuntimeError(f"AUTH answered {reply!r}")
        return reader, writer


async def set_get(reader, writer, i):
    key, value = b"idle-conns:%d" % i, b"value-%d" % i
    writer.write(command(b"SET", key, value) + command(b"GET", key))
    set_reply = await reader.readline()
    get_header = await reader.readline()
    get_body = await reader.readline()
    if set_reply != b"+OK\r\n" or get_body != value + b"\r\n":
        raise RuntimeError(f"SET/GET answered {set_reply!r} {get_header!r} {get_body!r}")


async def main(args) -> int:
    password = args.password.encode()
    baseline_kib = proc_status_kib(args.proxy_pid, "VmRSS")
    clients_before = redis_connected_clients(args.redis_port)

    gate = asyncio.Semaphore(IN_FLIGHT)
    started = time.monotonic()
    results = await asyncio.gather(
        *(open_authenticated(args.port, password, gate) for _ in range(args.count)),
        return_exceptions=True,
    )
    conns = [r for r in results if not isinstance(r, BaseException)]
    failures = [r for r in results if isinstance(r, BaseException)]
    print(f"opened and authenticated {len(conns)} of {args.count} connections "
          f"in {time.monotonic() - started:.1f} s")
    if failures:
        print(f"{len(failures)} failed, for example: {failures[0]!r}", file=sys.stderr)

    # A few connections do real work, spread over the whole range.
    used = sorted({0, len(conns) // 3, 2 * len(conns) // 3, len(conns) - 1}) if conns else []
    for i in used:
        await asyncio.wait_for(set_get(*conns[i], i), TIMEOUT_SECS)
    print(f"SET/GET checked on {len(used)} of them")

    await asyncio.sleep(IDLE_SECS)
    closed = sum(1 for reader, _ in conns if reader.at_eof())
    rss_kib = proc_status_kib(args.proxy_pid, "VmRSS")
    hwm_kib = proc_status_kib(args.proxy_pid, "VmHWM")
    fds = open_fds(args.proxy_pid)
    clients = redis_connected_clients(args.redis_port)

    idle = len(conns) - closed
    print(f"idle for {IDLE_SECS:.0f} s: {idle} still open, {closed} closed by the proxy")
    print(f"proxy RSS      {rss_kib / 1024:8.1f} MiB now, {hwm_kib / 1024:.1f} MiB peak, "
          f"{baseline_kib / 1024:.1f} MiB before connecting")
    if idle:
        print(f"per connection {(rss_kib - baseline_kib) / idle:8.1f} KiB above that baseline "
              f"({rss_kib / idle:.1f} KiB counting all of it)")
    print(f"proxy open fds {fds:8d}")
    # Our INFO connection is one of the clients Redis counts.
    print(f"redis-server connected_clients {clients} ({clients_before} before connecting, "
          f"both counting this INFO connection): "
          f"the proxy holds {clients - 1} upstream connections")
    ok = idle == args.count and rss_kib <= GOAL_MIB * 1024
    print(f"target: {args.count} idle authenticated connections in <= {GOAL_MIB} MiB RSS: "
          f"{'met' if ok else 'MISSED'}")

    for _, writer in conns:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="the proxy's port")
    parser.add_argument("--password", required=True, help="password of user default")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--proxy-pid", type=int, required=True)
    parser.add_argument("--redis-port", type=int, required=True)
    sys.exit(asyncio.run(main(parser.parse_args())))
