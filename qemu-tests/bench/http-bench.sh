#!/bin/sh
# The HTTP benchmark (steelcup.bench=http, run by `cargo xtask bench`):
# requests per second and latency with wrk to Debian's nginx in a microVM
# through a published port, beside the same nginx (the binary and config
# from the same image layer) run directly on the appliance, in one boot.
# Lines for the report start with "http-bench| ".
say() { echo "http-bench| $*"; }
finish() { echo "http-bench: done"; cup poweroff; exit "$1"; }
img=oci:/usr/lib/steelcup/bench/nginx:nginx
seconds=${HTTP_BENCH_SECONDS:-15}
conns=16
rounds=3
# One GET; succeeds when nginx's page comes back.
get() {
  printf 'GET / HTTP/1.0\r\nHost: bench\r\n\r\n' | nc -w 5 127.0.0.1 "$1" 2>/dev/null | grep -q 'Welcome to nginx'
}
# Waits up to $2 seconds for port $1 to serve the page.
serving() {
  i=0
  until get "$1"; do
    i=$((i+1)); [ $i -lt "$2" ] || return 1
    # Not silent: the harness takes 90 s of silence for a hung host.
    [ $((i % 30)) -ne 0 ] || echo "http-bench: waiting for port $1 ($i s)"
    sleep 1
  done
}
sleep 15 # the boot-time work (the warm pool's first VM) settles first

# nginx in a microVM: the image's own command and config, 1 vCPU (so
# `worker_processes auto` is one worker), port 80 published on 8080.
cup run -d --name nginx --cpus 1 -p 8080:80 "$img" >/dev/null || { say "error: cup run of $img failed"; finish 1; }
serving 8080 300 || { say "error: nginx in the microVM never served on 8080"; finish 1; }

# The same nginx on the appliance: the image's nginx.conf with one worker
# process (like the VM's), its site on port 80. The appliance has no
# www-data user, nor nginx's log and state directories; they are made here.
[ -e /etc/passwd ] || printf 'root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/false\n' > /etc/passwd
[ -e /etc/group ] || printf 'root:x:0:\nwww-data:x:33:\n' > /etc/group
mkdir -p /var/log/nginx /var/lib/nginx /run/bench-nginx
sed 's/^worker_processes .*/worker_processes 1;/' /etc/nginx/nginx.conf > /run/bench-nginx/nginx.conf
/usr/sbin/nginx -e stderr -c /run/bench-nginx/nginx.conf || { say "error: nginx on the host did not start"; finish 1; }
serving 80 60 || { say "error: nginx on the host never served on 80"; finish 1; }

say "setup: wrk -t1 -c$conns -d${seconds}s --latency, $rounds rounds alternating, after a 3 s warm-up of each"
wrk -t1 -c4 -d3s http://127.0.0.1:8080/ >/dev/null 2>&1
wrk -t1 -c4 -d3s http://127.0.0.1:80/ >/dev/null 2>&1
r=1
while [ $r -le $rounds ]; do
  wrk -t1 -c$conns -d${seconds}s --latency http://127.0.0.1:8080/ 2>&1 | sed "s/^/http-bench| round $r microvm: /"
  wrk -t1 -c$conns -d${seconds}s --latency http://127.0.0.1:80/ 2>&1 | sed "s/^/http-bench| round $r host: /"
  r=$((r+1))
done
finish 0
