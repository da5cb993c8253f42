#!/usr/bin/env bash
# Builds the Specula kernel modules against a second kernel series: the headers of
# Debian 12 backports' cloud kernel (Linux 6.12, the series Debian 13 ships).
#
#   mirror-driver/kmod/build-backports.sh OUT_DIR
#
# The three packages a module build needs (linux-headers-VERSION-cloud-amd64, its
# -common and linux-kbuild-VERSION) are fetched with a private apt configuration and
# unpacked, not installed, under OUT_DIR/headers; the one absolute path in them (the
# arch Makefile's include of -common) is pointed there. Backports are built for
# Debian 12, so their kbuild tools run here and their compiler is this gcc-12.
# Then build.sh builds the modules, failing on any warning. OUT_DIR gets
# specula_mirror.ko, specula_pin_baseline.ko and kernel-version.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ $# -eq 1 ] || { echo "usage: $0 OUT_DIR" >&2; exit 2; }
out="$(mkdir -p "$1" && cd "$1" && pwd)"
for tool in apt-get apt-cache dpkg-deb make gcc pahole; do
    command -v "$tool" >/dev/null || { echo "build-backports.sh: missing $tool (scripts/install-deps.sh installs it)" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # apt-get download drops privileges to _apt
apt="$work/apt"
mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
chmod -R 755 "$apt"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main" \
    > "$apt/sources.list"
opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache")
apt-get "${opts[@]}" update -qq || { echo "build-backports.sh: cannot fetch bookworm-backports' package lists" >&2; exit 1; }

depends() { apt-cache "${opts[@]}" depends "$1" 2>/dev/null | awk -v want="$2" '$1 == "Depends:" && $2 ~ want {print $2; exit}'; }
headers_pkg="$(depends linux-headers-cloud-amd64 '^linux-headers-[0-9]')"
[ -n "$headers_pkg" ] || { echo "build-backports.sh: cannot resolve linux-headers-cloud-amd64 in bookworm-backports" >&2; exit 1; }
common_pkg="$(depends "$headers_pkg" '^linux-headers-.*-common$')"
kbuild_pkg="$(depends "$headers_pkg" '^linux-kbuild-')"
[ -n "$common_pkg" ] && [ -n "$kbuild_pkg" ] || { echo "build-backports.sh: $headers_pkg names no -common or kbuild package" >&2; exit 1; }

(cd "$work" && apt-get "${opts[@]}" download "$headers_pkg" "$common_pkg" "$kbuild_pkg" >/dev/null 2>&1) \
    || { echo "build-backports.sh: cannot download $headers_pkg, $common_pkg and $kbuild_pkg" >&2; exit 1; }
root="$out/headers"
rm -rf "$root"
mkdir -p "$root"
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$root"; done
version="${headers_pkg#linux-headers-}"
tree="$root/usr/src/linux-headers-$version"
[ -f "$tree/Makefile" ] || { echo "build-backports.sh: $headers_pkg has no $tree/Makefile" >&2; exit 1; }
sed -i "s|^include /usr/src/|include $root/usr/src/|" "$tree/Makefile"
"$here/build.sh" "$tree" "$out"
echo "$version" > "$out/kernel-version"
echo "Specula modules built against $version -> $out"
