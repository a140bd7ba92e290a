"""nginx (Debian's package) in front of local replicas, with one of the project's configs (deploy/nginx/): only
the listen port, the access log's place and the upstream list are the caller's. Used by the load-balancer test
and `dspark loadtest routing`."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from dspark.loadtest.sweep import REPO, answers_ok, free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


class Nginx:
    """nginx -p <prefix> -c deploy/nginx/<conf>, its upstream file (the conf's `include`) listing `backends`,
    each with `server_flags`; `edit` may rewrite the conf first (e.g. to drop a balancing directive)."""

    def __init__(self, prefix: Path, backends: list[str], conf: str = "nginx.conf",
                 server_flags: str = "max_fails=2 fail_timeout=10s", edit=None):
        self.prefix, self.port = prefix, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        text = (REPO / "deploy/nginx" / conf).read_text()
        assert "listen 8080;" in text and "access_log /dev/stdout dspark;" in text
        text = text.replace("listen 8080;", f"listen 127.0.0.1:{self.port};")
        text = text.replace("access_log /dev/stdout dspark;", "access_log access.log dspark;")
        # temp files inside the prefix, so it needs no write access to Debian's /var/lib/nginx
        temps = "".join(f"    {k}_temp_path tmp/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        text = text.replace("http {\n", "http {\n" + temps, 1)
        if edit is not None:
            text = edit(text)
        upstreams = re.search(r"^\s*include (\S+);", text, re.M).group(1)
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        (prefix / "nginx.conf").write_text(text)
        (prefix / upstreams).write_text("".join(f"server {b} {server_flags};\n" for b in backends))
        self.proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                                      "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=open(prefix / "stderr.log", "w"))
        deadline = time.time() + 15
        while not answers_ok(self.url + "/health"):
            if time.time() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"nginx did not start: {(prefix / 'stderr.log').read_text()}")
            time.sleep(0.05)

    def access_log(self) -> list[str]:
        return (self.prefix / "access.log").read_text().splitlines()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
