"""Which feature holds which share of the gateway's instructions per request.

    .venv/bin/python -m benchmarks.shares [--requests 1000] [feature ...]

Each feature is switched off in a scratch copy of ``gateway/`` (a patch of its source, or a
setting), and the copy is counted under callgrind as :mod:`benchmarks.instructions` counts the
real one; the feature's share is what switching it off saves. The copies exist only to be
measured: none of them is a supported configuration. A patch whose text no longer appears in
the source fails loudly (a unit test applies them all), so the table cannot silently measure
nothing.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from benchmarks.harness import ROOT, nginx_upstream
from benchmarks.instructions import count

Patch = tuple[str, str, str]  # file, text, replacement
_METRICS_OFF: list[Patch] = [
    (f"gateway/{module}.py", f"    def {name}(self, {args}) -> None:\n",
     f"    def {name}(self, {args}) -> None:\n        return\n")
    for module, name, args in (
        ("metrics_credential", "upstream_response", "method: str, route: str, status: int, "
                                                    "seconds: float"),
        ("metrics", "response", "source: str, status: int, code: str"),
        ("metrics", "request_done", "method: str, route: str, status: int, seconds: float"),
        ("metrics", "client_request", "client: str"))]

#: Feature: (what it is, patches, settings).
FEATURES: dict[str, tuple[str, list[Patch], dict[str, str]]] = {
    "access_line": ("the JSON access line, formatted and batched", [
        ("gateway/proxy/handler.py", "            log_request(request, rid, outcome, started,",
         "            0 and log_request(request, rid, outcome, started,")], {}),
    "access_line_format": ("of which: formatting it (a constant line written instead)", [
        ("gateway/proxy/outcome.py", "        sink.write(access_line(time.time(), ",
         "        sink.write('{}\\n' or access_line(time.time(), ")], {}),
    "metrics": ("the per-request metrics (5 families)", _METRICS_OFF, {}),
    "read_timeout": ("the upstream read timeout (aiohttp's sock_read timer)", [],
                     {"GATEWAY_READ_TIMEOUT": "0"}),
    "breaker": ("the circuit breaker's check, ticket and record", [
        ("gateway/proxy/exchange.py", "            ticket = upstream.breaker.admit()",
         "            ticket = None"),
        ("gateway/proxy/exchange.py", "                upstream.breaker.record(ticket, result)",
         "                pass"),
        ("gateway/proxy/admission.py", "    lane.upstream.breaker.check()", "    pass")], {}),
    "retry_budget": ("the retry budget's request count", [
        ("gateway/proxy/exchange.py", "            upstream.retry.budget.request()",
         "            pass")], {}),
    "admission": ("the inbound checks (HTTP version, target, route allow-list, size)", [
        ("gateway/proxy/admission.py", "    decoded = check_request(request, config.auth_paths)",
         "    decoded = request.path"),
        ("gateway/proxy/admission.py", "    access.check_route(request.method, decoded)",
         "    pass"),
        ("gateway/proxy/admission.py",
         "    check_declared_size(request, config.proxy.max_body_size)", "    pass")], {}),
    "header_deadline": ("the slow-header deadline and its protocol subclass", [
        ("gateway/proxy/inbound.py", "        return GatewayRequestHandler(self, loop=",
         "        return web.RequestHandler(self, loop=asyncio.get_running_loop(), "
         "**self._protocol_kwargs) if 1 else GatewayRequestHandler(self, loop=")], {}),
    "route_401": ("the persistent-401 bookkeeping of answers", [
        ("gateway/token/route_401.py", 'request sent at ``sent_at``."""\n',
         'request sent at ``sent_at``."""\n        return\n')], {}),
    "traffic_tally": ("the refusal tally (two additions)", [
        ("gateway/token/traffic.py", "    def answered(self, status: int) -> None:\n",
         "    def answered(self, status: int) -> None:\n        return\n")], {}),
}


def scratch_copy(patches: list[Patch], into: Path) -> Path:
    """``gateway/`` copied under ``into`` with ``patches`` applied (each must apply)."""
    shutil.copytree(ROOT / "gateway", into / "gateway",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for file, text, replacement in patches:
        path = into / file
        source = path.read_text()
        if text not in source:
            raise RuntimeError(f"{file}: the patch's text is gone: {text.strip()[:60]!r}")
        path.write_text(source.replace(text, replacement, 1))
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("features", nargs="*", default=list(FEATURES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="repairy-shares-") as tmp, nginx_upstream(
            Path(tmp)) as upstream:
        d = Path(tmp)
        n = args.requests
        floor = count("floor", n, upstream, d) / n
        whole = count("gateway", n, upstream, d) / n
        print(f"instructions per request: floor {floor:,.0f}, gateway {whole:,.0f} "
              f"(+{whole - floor:,.0f})")
        print()
        print("| feature | what | saves | share of the gateway | share of its excess |")
        print("|---|---|---|---|---|")
        for name in args.features:
            what, patches, settings = FEATURES[name]
            copy = scratch_copy(patches, d / f"copy-{name}")
            without = count(f"without-{name}", n, upstream, d, copy, settings) / n
            saved = whole - without
            print(f"| {name} | {what} | {saved:,.0f} | {saved / whole:.1%} | "
                  f"{saved / (whole - floor):.1%} |", flush=True)


if __name__ == "__main__":
    main()
