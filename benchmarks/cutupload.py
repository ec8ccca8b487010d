"""Resumable uploads on a link that drops: sudo ./run.sh bench cutupload --profile terrible

The client link carries the profile, and the harness cuts every client connection to the proxy
every --cut-every seconds (`ss -K` in the client namespace: the client's socket is aborted and the
proxy gets a reset, as when a link drops). A file is uploaded through fileproxy, which resumes
after every cut, with (1) tus and tuspy, (2) tus and tus-js-client under node, (3) tus-js-client
speaking the IETF draft straight at a proxied path, and as one plain PUT (4) through nginx and (5)
through fileproxy, which must start over each time. Reports whether each completed within its
deadline, how long it took, and whether the upstream got it byte-exact.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tomllib

from benchmarks.common import markdown_table, progress, save_results
from benchmarks.cutclient import JS_DIR
from benchmarks.net import SCENARIOS, Run
from benchmarks.targets import Place, Running, Workdir, start_fileproxy, start_nginx
from benchmarks.topology import (
    ORIGIN_ADDR,
    PROXY_CLIENT_SIDE,
    Topology,
    killing,
    require_root_and_ip,
)


def upload(topology: Topology, args: list[str], cut_every: float, deadline: float
           ) -> dict[str, object]:
    with killing(topology, topology.client, ("dst", PROXY_CLIENT_SIDE), cut_every) as cuts:
        out = topology.ns_run(topology.client, sys.executable, "-m", "benchmarks.cutclient",
                              *args, "--deadline", str(deadline), check=False)
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {"completed": False, "error": out.stderr[-300:]}
    return {**result, "connections_cut": cuts.connections}


def tusjs_ready() -> bool:
    """node, and tus-js-client where the tests install it."""
    return shutil.which("node") is not None and (
        JS_DIR / "node_modules" / "tus-js-client" / "package.json").exists()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="terrible")
    parser.add_argument("--size-mib", type=float, default=64)
    parser.add_argument("--cut-every", type=float, default=30)
    parser.add_argument("--deadline", type=float, default=7200,
                        help="for each resumable upload")
    parser.add_argument("--put-deadline", type=float, default=600,
                        help="for each plain PUT (it cannot finish: one PUT would need the whole "
                             "file within one cut interval)")
    args = parser.parse_args()
    require_root_and_ip()
    scenario = tomllib.loads(SCENARIOS.read_text())
    run = Run(args.profile, scenario["profiles"][args.profile], scenario.get("defaults", {}),
              "client", quick=False)
    work = Workdir()
    results: dict[str, dict[str, object]] = {}
    with Topology(emulation=run.defaults.get("emulator", "auto")) as topology:
        try:
            topology.build(run.netem_spec("client"), run.netem_spec("origin"),
                           scenario["defaults"].get("congestion", {}))
            origin_place = Place(ORIGIN_ADDR, topology.origin)
            port = 9400
            origin = origin_place.spawn([sys.executable, "-m", "tests.origin", "--host",
                                         ORIGIN_ADDR, "--port", str(port)])
            origin_place.wait(f"http://{ORIGIN_ADDR}:{port}/_origin/events", origin)
            origin_running = Running("origin (aiohttp)", f"http://{ORIGIN_ADDR}:{port}", origin)
            place = Place(PROXY_CLIENT_SIDE, topology.proxy)
            fileproxy = start_fileproxy(origin_running, work, ["--spool-dir", str(work.path)],
                                        place)
            nginx = start_nginx(origin_running, work, place)
            source = work.path / "upload.bin"
            source.write_bytes(os.urandom(int(args.size_mib * 1024 * 1024)))
            resumable = {"tus (tuspy) via fileproxy": ["tus"],
                         "tus (tus-js-client) via fileproxy": ["tusjs"],
                         "IETF draft (tus-js-client) via fileproxy": ["tusjs", "--ietf"]}
            if not tusjs_ready():
                progress("tus-js-client rows skipped: node and tests/js/node_modules are needed "
                         "(apt-get install nodejs npm; cd tests/js && npm ci)")
                resumable = {"tus (tuspy) via fileproxy": ["tus"]}
            for name, mode in resumable.items():
                progress(f"{name}, cut every {args.cut_every:g} s")
                results[name] = upload(
                    topology, [*mode, fileproxy.url, str(source), f"/echo/cut/{len(results)}"],
                    args.cut_every, args.deadline)
                progress(f"... {results[name]}")
            plain = [("PUT via nginx", nginx), ("PUT via fileproxy", fileproxy)]
            for name, target in plain:
                if target is None:
                    continue
                progress(f"{name}, cut every {args.cut_every:g} s")
                results[name] = upload(topology, ["put", f"{target.url}/echo/cut", str(source)],
                                       args.cut_every, args.put_deadline)
                progress(f"... {results[name]}")
        finally:
            work.remove()
    rows = [[name, r.get("completed"), r.get("seconds"), r.get("attempts"),
             r.get("connections_cut"), r.get("intact", "-"), r.get("most_bytes_sent", "-")]
            for name, r in results.items()]
    profile = run.profile
    markdown = (f"{args.size_mib:g} MiB upload, `{args.profile}` on the client link (RTT "
                f"{profile['rtt_ms']} ms, {profile['rate_mbit']} Mbit/s, {profile['loss'] * 100:g}% "
                f"loss), every client connection cut every {args.cut_every:g} s, deadline "
                f"{args.deadline:g} s for tus and {args.put_deadline:g} s per plain PUT.\n\n"
                + markdown_table(["upload", "completed", "seconds", "attempts", "connections cut",
                                  "byte-exact", "most bytes in one PUT"], rows))
    print(markdown)
    save_results(f"cutupload-{args.profile}", {"results": results, "args": vars(args)}, markdown)


if __name__ == "__main__":
    main()
