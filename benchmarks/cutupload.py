"""Resumable uploads on a link that drops: sudo ./run.sh bench cutupload --profile terrible

The client link carries the profile and the client's connection is cut every --cut-every seconds.
A file is uploaded (1) with tus through fileproxy, which resumes after every cut, and (2) as one
plain PUT through nginx and (3) through fileproxy, which must start over each time. Reports whether
each completed within the deadline, how long it took, and whether the upstream got it byte-exact.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib

from benchmarks.common import markdown_table, progress, save_results
from benchmarks.net import SCENARIOS, Run
from benchmarks.targets import Place, Workdir, start_fileproxy, start_nginx
from benchmarks.topology import ORIGIN_ADDR, PROXY_CLIENT_SIDE, Topology, require_root_and_ip


def upload(topology: Topology, args: list[str], deadline: float) -> dict[str, object]:
    out = topology.ns_run(topology.client, sys.executable, "-m", "benchmarks.cutclient", *args,
                          check=False).stdout.strip().splitlines()
    return json.loads(out[-1]) if out else {"completed": False, "error": "no answer"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="terrible")
    parser.add_argument("--size-mib", type=float, default=64)
    parser.add_argument("--cut-every", type=float, default=30)
    parser.add_argument("--deadline", type=float, default=3600)
    args = parser.parse_args()
    require_root_and_ip()
    scenario = tomllib.loads(SCENARIOS.read_text())
    run = Run(args.profile, scenario["profiles"][args.profile], scenario.get("defaults", {}),
              "client", quick=False)
    work = Workdir()
    results: dict[str, dict[str, object]] = {}
    with Topology() as topology:
        try:
            topology.build(run.netem_spec("client"), run.netem_spec("origin"),
                           scenario["defaults"].get("congestion", {}))
            origin_place = Place(ORIGIN_ADDR, topology.origin)
            port = 9400
            origin = origin_place.spawn([sys.executable, "-m", "tests.origin", "--host",
                                         ORIGIN_ADDR, "--port", str(port)])
            origin_place.wait(f"http://{ORIGIN_ADDR}:{port}/_origin/events", origin)
            from benchmarks.targets import Running

            origin_running = Running("origin (aiohttp)", f"http://{ORIGIN_ADDR}:{port}", origin)
            place = Place(PROXY_CLIENT_SIDE, topology.proxy)
            fileproxy = start_fileproxy(origin_running, work, ["--spool-dir", str(work.path)],
                                        place)
            nginx = start_nginx(origin_running, work, place)
            source = work.path / "upload.bin"
            source.write_bytes(os.urandom(int(args.size_mib * 1024 * 1024)))
            common = ["--cut-every", str(args.cut_every), "--deadline", str(args.deadline)]
            progress("tus through fileproxy")
            results["tus via fileproxy"] = upload(
                topology, ["tus", fileproxy.url, str(source), "/echo/cut", *common], args.deadline)
            progress(f"... {results['tus via fileproxy']}")
            if nginx is not None:
                progress("plain PUT through nginx")
                results["PUT via nginx"] = upload(
                    topology, ["put", f"{nginx.url}/echo/cut", str(source), *common],
                    args.deadline)
                progress(f"... {results['PUT via nginx']}")
            progress("plain PUT through fileproxy")
            results["PUT via fileproxy"] = upload(
                topology, ["put", f"{fileproxy.url}/echo/cut", str(source), *common],
                args.deadline)
            progress(f"... {results['PUT via fileproxy']}")
        finally:
            work.remove()
    rows = [[name, r.get("completed"), r.get("seconds"), r.get("attempts"), r.get("intact", "-")]
            for name, r in results.items()]
    profile = run.profile
    markdown = (f"{args.size_mib:g} MiB upload, `{args.profile}` on the client link (RTT "
                f"{profile['rtt_ms']} ms, {profile['rate_mbit']} Mbit/s, {profile['loss'] * 100:g}% "
                f"loss), the client's connection cut every {args.cut_every:g} s, deadline "
                f"{args.deadline:g} s.\n\n"
                + markdown_table(["upload", "completed", "seconds", "attempts", "byte-exact"],
                                 rows))
    print(markdown)
    save_results(f"cutupload-{args.profile}", {"results": results, "args": vars(args)}, markdown)


if __name__ == "__main__":
    main()
