#!/bin/sh
# The image's entry point: fix ownership of mounted data directories, then run
# luma-proxy (which drops root itself: luma_proxy/startup.py drop_root).
#
# The Luma CLI bind-mounts host directories owned by its SSH user
# (./.luma/luma-proxy-certs -> /var/lib/luma-proxy/certs, ./.luma/luma-proxy-config
# -> /tmp). As root, hand what the proxy must write to its user (what is not
# already its), as the official postgres image does with its data directory,
# and make a /tmp that is not world-writable usable again. Started as any other
# user (--user 10001:10001, --cap-drop ALL), change nothing.
set -eu
user=${LUMA_PROXY_USER:-10001:10001}
if [ "$(id -u)" = 0 ]; then
    for dir in /var/lib/luma-proxy /var/lib/luma-proxy/certs; do
        [ -d "$dir" ] || continue
        find "$dir" -xdev \( ! -user "${user%%:*}" -o ! -group "${user##*:}" \) \
            -exec chown "$user" {} + 2>/dev/null \
            || echo "luma-proxy: cannot change the owner of $dir to $user" >&2
    done
    if [ -d /tmp ] && [ "$(stat -c %a /tmp)" != 1777 ]; then
        chmod 1777 /tmp 2>/dev/null || echo "luma-proxy: cannot make /tmp writable" >&2
    fi
fi
exec luma-proxy "$@"
