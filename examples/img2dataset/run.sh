#!/usr/bin/env bash
# img2dataset as users run it (issue #19 item 6): img2dataset itself crawls a few URLs from a loopback HTTP
# server (five images, a web page that is not an image, a 404) in its webdataset and its parquet output
# formats, and `python -m data_tools ingest` takes each output into a fresh data root.
#
#   examples/img2dataset/run.sh        or   make img2dataset-example
#
# Environment (all optional):
#   IMG2DATASET_VENV  the side venv holding img2dataset (default .venv-img2dataset, git-ignored); created with
#                     img2dataset==$IMG2DATASET_VERSION when it has no bin/img2dataset (~45 s from a local mirror)
#   PYTHON            GrowCLIP's interpreter (default .venv/bin/python)
#   WORK              where the site, the crawls and the data roots go (default: a new temp dir, kept)
# img2dataset pulls albumentations, opencv, pyarrow, pandas, wandb...: it lives in its own venv, never in .venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
IMG2DATASET_VENV=${IMG2DATASET_VENV:-.venv-img2dataset}
IMG2DATASET_VERSION=${IMG2DATASET_VERSION:-1.47.0}
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-$(mktemp -d -t growclip-img2dataset.XXXXXX)}
TIMEFORMAT="  took %R s"

if [ ! -x "$PY" ]; then
    echo "error: $PY not found; run \`make venv\` first (or set PYTHON)" >&2
    exit 2
fi
if [ ! -x "$IMG2DATASET_VENV/bin/img2dataset" ]; then
    echo "== creating $IMG2DATASET_VENV with img2dataset==$IMG2DATASET_VERSION"
    time {
        python3 -m venv "$IMG2DATASET_VENV"
        "$IMG2DATASET_VENV/bin/pip" install --disable-pip-version-check -q "img2dataset==$IMG2DATASET_VERSION"
    }
fi
mkdir -p "$WORK"
echo "== work dir: $WORK"

# the site, served on loopback by python's own http.server
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PY" examples/img2dataset/make_site.py "$WORK/site" "http://127.0.0.1:$PORT" >"$WORK/urls.csv"
python3 -m http.server "$PORT" --bind 127.0.0.1 --directory "$WORK/site" >"$WORK/http.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/', timeout=1)" 2>/dev/null && break
    sleep 0.1
done
echo "== serving $(($(wc -l <"$WORK/urls.csv") - 1)) URLs on http://127.0.0.1:$PORT ($WORK/urls.csv: url, caption)"

for fmt in webdataset parquet; do
    echo "== img2dataset --output_format $fmt"
    # --disallowed_header_directives '[]': the loopback server sends no X-Robots-Tag, but img2dataset would
    # otherwise drop any image whose response carries noai/noindex; the crawl is ours, so nothing is skipped
    time "$IMG2DATASET_VENV/bin/img2dataset" --url_list "$WORK/urls.csv" --input_format csv \
        --url_col url --caption_col caption --output_format "$fmt" --output_folder "$WORK/$fmt" \
        --processes_count 1 --thread_count 4 --image_size 64 --resize_mode border --timeout 5 --retries 0 \
        --disallowed_header_directives '[]' --enable_wandb False >"$WORK/img2dataset-$fmt.log" 2>&1 ||
        { tail -20 "$WORK/img2dataset-$fmt.log"; exit 1; }
    grep '^total' "$WORK/img2dataset-$fmt.log" | tail -1 || true
    echo "   wrote: $(cd "$WORK/$fmt" && ls | tr '\n' ' ')"
    echo "== ingest $WORK/$fmt (--format auto) -> $WORK/root-$fmt"
    time "$PY" -m data_tools ingest --input "$WORK/$fmt" --data-root "$WORK/root-$fmt" --image-size 64
    "$PY" -m data_tools stats "$WORK/root-$fmt"
done
