#!/usr/bin/env bash
# The main job on a demo store: install what is missing, build a VM disk
# (a partitioned ext4 filesystem in three versions, as a qcow2 chain),
# import it, mount the store, browse it, and copy a file out of a past
# snapshot.  Everything is unmounted at the end, even on failure.
#
#   scripts/demo.sh [WORKDIR]       (default: /tmp/snapfs-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
if [ "$(id -u)" -ne 0 ]; then
    echo "demo.sh: loop-mounting a snapshot needs root; run as root" >&2
    exit 1
fi

WORK="${1:-/tmp/snapfs-demo}"
SNAPFS=".venv/bin/snapfs"
STORE="$WORK/store"
MNT="$WORK/mnt"
OLD="$WORK/old-root"
NEW="$WORK/new-root"

cleanup() {
    for m in "$OLD" "$NEW"; do mountpoint -q "$m" 2>/dev/null && umount "$m"; done
    mountpoint -q "$MNT" 2>/dev/null && "$SNAPFS" umount "$MNT"
    return 0
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

rm -rf "$WORK"
mkdir -p "$WORK" "$MNT" "$OLD" "$NEW"

step "Build a VM disk: MBR, ext4 partitions, three versions as a qcow2 chain"
.venv/bin/python scripts/ext4chain.py "$WORK/images" --table mbr
qemu-img info --backing-chain "$WORK/images/v3.qcow2" | grep -E '^(image|backing file):'

step "Create a store and import the chain (each backing layer becomes a snapshot)"
"$SNAPFS" init "$STORE"
"$SNAPFS" vm add "$STORE" web01 --disk "sda=$WORK/images/v3.qcow2" --disk data=2G
"$SNAPFS" vm list "$STORE"
"$SNAPFS" snapshot list "$STORE" web01
"$SNAPFS" check "$STORE"

step "Mount the store"
"$SNAPFS" mount "$STORE" "$MNT"
# The files inside the file trees (<disk>-partN/) are left out: see below.
(cd "$MNT" && find . -regextype posix-extended -regex '.*(-part[0-9]+|\.files)/.*' -prune \
    -o -print | sort | sed 's|^\./||' | while read -r p; do
    if [ -L "$p" ]; then printf '  %-44s -> %s\n' "$p" "$(readlink "$p")"
    elif [ -f "$p" ]; then printf '  %-44s %12s bytes\n' "$p" "$(stat -c %s "$p")"
    else printf '  %s/\n' "$p"; fi
done)

step "snapshot.json of the oldest snapshot"
cat "$MNT/web01/snapshots/base/snapshot.json"

step "Loop-mount partition 1 of snapshot 'base' and of the active state (read-only)"
mount -o loop,ro "$MNT/web01/snapshots/base/sda-part1.raw" "$OLD"
mount -o loop,ro "$MNT/web01/active/sda-part1.raw" "$NEW"
echo "base:   $(cat "$OLD/var/www/index.html")"
echo "active: $(cat "$NEW/var/www/index.html")"

step "Copy a file out of the past snapshot"
cp "$OLD/var/www/index.html" "$WORK/index.html.from-base"
ls -l "$WORK/index.html.from-base"
echo "diff between the copy and the current file:"
diff "$WORK/index.html.from-base" "$NEW/var/www/index.html" || true
if cmp -s "$WORK/index.html.from-base" "$NEW/var/www/index.html"; then
    echo "demo: expected the old file to differ from the current one" >&2
    exit 1
fi
echo "all differences between base and active:"
diff -rq "$OLD" "$NEW" | sed 's/^/  /' || true

umount "$OLD" "$NEW"

step "Or with no loop device: each snapshot's files are a directory (sda-part1/)"
TREE="$MNT/web01/snapshots/base/sda-part1"
ls -l "$TREE/var/www"
cp "$TREE/var/www/index.html" "$WORK/index.html.from-tree"
cmp "$WORK/index.html.from-base" "$WORK/index.html.from-tree"
echo "same bytes as through the loop mount"

step "Create a snapshot from the shell: touch snapshots/before-upgrade"
touch "$MNT/web01/snapshots/before-upgrade"
ls -l "$MNT/web01/snapshots"

step "Change the active disk: loop-mount its partition read-write and edit a file"
mount -o loop "$MNT/web01/active/sda-part1.raw" "$NEW"
echo "<h1>after the upgrade</h1>" > "$NEW/var/www/index.html"
umount "$NEW"
mount -o loop,ro "$MNT/web01/snapshots/before-upgrade/sda-part1.raw" "$OLD"
mount -o loop,ro "$MNT/web01/active/sda-part1.raw" "$NEW"
echo "before-upgrade: $(cat "$OLD/var/www/index.html" | head -1)"
echo "active:         $(cat "$NEW/var/www/index.html")"
umount "$OLD" "$NEW"

step "What changed since before-upgrade: snapfs diff (from the qcow2 maps, then the inodes)"
"$SNAPFS" diff "$STORE" web01 before-upgrade active

step "Delete snapshot v2 with rmdir: its layer is merged away, nothing else changes"
sha_before=$(sha256sum < "$MNT/web01/snapshots/before-upgrade/sda.raw")
rmdir "$MNT/web01/snapshots/v2"
while grep -q '"state": "running"' "$MNT/web01/control/status"; do sleep 0.2; done
python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print("last operation:", json.dumps(s["last_operation"]))' \
    "$MNT/web01/control/status"
ls "$MNT/web01/snapshots"
sha_after=$(sha256sum < "$MNT/web01/snapshots/before-upgrade/sda.raw")
[ "$sha_before" = "$sha_after" ] && echo "before-upgrade reads the same bytes as before the merge"

step "Unmount and check the store"
"$SNAPFS" umount "$MNT"
"$SNAPFS" check "$STORE"
for vol in "$STORE"/vms/web01/*-*; do qemu-img check -q "$vol"; done && echo "qemu-img check: every volume clean"
echo "done: the demo store is in $STORE"
