#!/usr/bin/env bash
# Two real-English corpora from Debian packages, each as a 1024-piece SentencePiece tokenizer + shards:
#   fortunes/data  the `fortunes` package, built exactly as tools/ngram_gain_fortunes.sh builds it
#   debdocs/data   English documentation prose (Python, PostgreSQL and Django manuals, the Debian
#                  handbook/reference/policy/FAQ, the GIMP user manual, the Linux man pages), one
#                  document per paragraph, shuffled, with VAL_BYTES (default 4.5 MB) of text in val
# Installs the packages it needs (apt-get, as root), then rebuilds everything under the output folder.
#   bash tools/english_corpora.sh [OUT_DIR]        # default runs/english/; summary in OUT_DIR/corpora.log
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$root/runs/english}" && cd "${1:-$root/runs/english}" && pwd)
val_bytes=${VAL_BYTES:-4500000}
py=${PYTHON:-python3}
text_tool="$root/tools/english_text.py"

doc_pkgs="python3.11-doc postgresql-doc-15 python-django-doc debian-handbook debian-reference-en debian-policy
          developers-reference debian-faq gimp-help-en manpages manpages-dev"
pkgs="fortunes $doc_pkgs"
missing=$(for p in $pkgs; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || echo "$p"; done)
if [ -n "$missing" ]; then
  echo "installing:" $missing
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
command -v man >/dev/null || { echo "error: man(1) is needed to render the man pages: apt-get install man-db" >&2; exit 1; }

exec > >(tee "$out/corpora.log") 2>&1
echo "# packages (dpkg-query -W)"
dpkg-query -W $pkgs
echo "# $(date -u +%FT%TZ) python: $($py -c 'import sentencepiece, sys; print(sys.version.split()[0], "sentencepiece", sentencepiece.__version__)')"

# Corpus A: fortunes (the same command as tools/ngram_gain_fortunes.sh).
echo "## fortunes"
src=/usr/share/games/fortunes
rm -rf "$out/fortunes/data"
mkdir -p "$out/fortunes"
files=$(find "$src" -maxdepth 1 -type f ! -name '*.dat' | sort)
$py "$root/tools/build_corpus.py" --out "$out/fortunes/data" --text $files --shuffle --val-docs 1500 --vocab-size 1024
$py "$text_tool" split --val-docs 1500 $files
$py "$text_tool" val-bytes "$out/fortunes/data"

# Corpus B: documentation prose, one text file per package; a paragraph already taken from an
# earlier package (or page) is dropped, so nothing is both in val and in train verbatim.
echo "## debdocs"
text="$out/debdocs/text"
rm -rf "$out/debdocs"
mkdir -p "$text"
seen="$text/.seen"
files_of() {  # the package's regular files whose path matches the pattern, minus the exclusion
  dpkg -L "$1" | grep -E "$2" | { if [ -n "${3:-}" ]; then grep -vE "$3"; else cat; fi; } | sort
}
extract() {  # kind package pattern [exclude]
  local kind=$1 pkg=$2
  # shellcheck disable=SC2046
  $py "$text_tool" "$kind" "$text/$pkg.txt" --seen "$seen" $(files_of "$pkg" "$3" "${4:-}")
}
sphinx_skip='/_sources/|/_static/|/_downloads/|/genindex|/search\.html$|/py-modindex\.html$|/download\.html$'
extract html python3.11-doc '/html/.*\.html$' "$sphinx_skip"
extract html postgresql-doc-15 '/html/.*\.html$' '/bookindex\.html$'
extract html python-django-doc '/html/.*\.html$' "$sphinx_skip"
extract html debian-handbook '/html/en-US/.*\.html$'
extract html debian-reference-en '\.en\.html$'
extract html debian-policy '\.html$' "$sphinx_skip"
extract html developers-reference '\.html$' "$sphinx_skip"
extract html debian-faq '\.en\.html$'
extract html gimp-help-en '/help/en/.*\.html$'
extract man manpages '/usr/share/man/man[0-9]/.*\.gz$'
extract man manpages-dev '/usr/share/man/man[0-9]/.*\.gz$'
doc_files=$(for p in $doc_pkgs; do echo "$text/$p.txt"; done)
split=$($py "$text_tool" split --val-bytes "$val_bytes" $doc_files)
echo "$split"
val_docs=$(echo "$split" | sed -E 's/.*val_docs:([0-9]+).*/\1/')
$py "$root/tools/build_corpus.py" --out "$out/debdocs/data" --text $doc_files --shuffle --val-docs "$val_docs" \
  --vocab-size 1024
$py "$text_tool" val-bytes "$out/debdocs/data"
echo "# done: $out/fortunes/data $out/debdocs/data"
