# Shell functions shared by scripts/build-test-images.sh and scripts/build-image.sh (sourced; each defines
# its own `die` first). Both build Debian roots with debootstrap from the machine's own apt mirror, so no
# mirror's name is ever written into the repository.

# The URI of the machine's apt source for the Debian archive itself: the first deb source whose suites
# include a plain release name (bookworm, not bookworm-security); deb822 first, then one-line style.
debian_mirror() {
    local m
    m=$(awk 'FNR == 1 || /^[ \t]*$/ { bad = suite = 0; uri = "" }
             /^Types:/ && !/[ \t]deb([ \t]|$)/ { bad = 1 }
             /^Suites:/ { for (i = 2; i <= NF; i++) if ($i !~ /[-\/]/) suite = 1 }
             /^URIs:/ { uri = $2 }
             !bad && suite && uri != "" { print uri; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$m" ] || m=$(awk '$1 == "deb" { sub(/\[[^]]*\][ \t]*/, ""); if ($3 !~ /[-\/]/) { print $2; exit } }' \
        /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$m" ] || die "no apt source for the Debian archive in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
    echo "$m"
}

# Unmount whatever a killed debootstrap left mounted under $1 (it bind-mounts /dev in
# containers), then delete it without ever crossing into another file system.
remove_tree() {
    local m
    awk -v d="$1/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r |
        while IFS= read -r m; do umount -l "$m"; done
    rm -rf --one-file-system "$1"
}

# debootstrap from Debian's packages, refreshing the package lists only when it has no install candidate.
ensure_debootstrap() {
    command -v debootstrap >/dev/null && return 0
    export DEBIAN_FRONTEND=noninteractive
    apt-cache policy debootstrap 2>/dev/null | grep -q 'Candidate: [0-9]' || apt-get update -qq
    apt-get install -y -qq -o DPkg::Lock::Timeout=120 --no-install-recommends debootstrap >/dev/null ||
        die "'apt-get install debootstrap' failed"
}
