#!/usr/bin/env bash
# Download the Llama 2 weights and tokenizer with the presigned URL Meta emails you.
#
#   ./download.sh                      asks for the URL and the models, like Meta's script
#   ./download.sh --url 'URL' --models 7B,7B-chat --target /data/llama
#   PRESIGNED_URL='URL' MODEL_SIZE=7B TARGET_FOLDER=/data/llama ./download.sh
#
# Every file is downloaded to NAME.part, resumed if it is already there, checked
# against Meta's md5 checklist with llama/checkpoints/checklist.py and only then renamed to
# NAME. Re-running skips what is already downloaded and verified. Run with --help
# for the options and the environment variables.
#
# Written for bash 3.2 (macOS) as well as newer bash: no associative arrays, no
# ${var,,}, no mapfile.

if [ -z "${BASH_VERSION:-}" ]; then
    echo "download.sh needs bash: run it as ./download.sh or bash download.sh" >&2
    exit 2
fi

set -u
set -f # no file name globbing: nothing here wants it, and names come from the network
DEFAULT_IFS=$IFS

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VERIFIER="$SCRIPT_DIR/llama/checkpoints/checklist.py"
ALL_MODELS="7B,13B,70B,7B-chat,13B-chat,70B-chat"
NEW_LINK_PAGE="https://ai.meta.com/resources/models-and-libraries/llama-downloads/"

# Exit statuses (also listed in --help and docs/DOWNLOADING.md).
EXIT_FAILURE=1      # any other failure (HTTP 404, disk full, ...)
EXIT_USAGE=2        # bad arguments, unknown model, no or malformed URL, missing tools
EXIT_REFUSED=3      # HTTP 403/401: the link expired or was used up
EXIT_NETWORK=4      # connection refused, host not found, timeout, dropped connection
EXIT_CHECKSUM=5     # a file did not match its md5 checklist
EXIT_HTML=6         # a web page came back instead of the file

usage() {
    cat <<EOF
Usage: download.sh [--url URL] [--models LIST] [--target DIR]

Downloads LICENSE, USE_POLICY.md, tokenizer.model (md5-checked against
tokenizer_checklist.chk) and, for each chosen model, its consolidated.NN.pth
shards and params.json (md5-checked against the model's checklist.chk).

  --url URL       the presigned URL from Meta's email (quote it: it holds '?', '&', '*')
  --models LIST   comma-separated models: $ALL_MODELS;
                  empty means all six
  --target DIR    folder to download into (default: the current folder)
  -h, --help      show this help

Without --url / --models the script asks for them, like Meta's original.
Flags win over these environment variables:
  PRESIGNED_URL   the URL             MODEL_SIZE      the model list
  TARGET_FOLDER   the target folder   DOWNLOADER      curl or wget (default: curl if present)
  DOWNLOAD_RETRIES      retries after a network or server error (default 4)
  DOWNLOAD_RETRY_DELAY  seconds before the first retry, doubled each time (default 2)
  DOWNLOAD_TIMEOUT      seconds without data before a transfer is abandoned (default 120)
  PYTHON          the Python 3 used to verify checksums (default: python3)

Model folders: llama-2-7b, llama-2-7b-chat (1 shard each), llama-2-13b,
llama-2-13b-chat (2 shards), llama-2-70b, llama-2-70b-chat (8 shards).

Exit status: 0 done, 1 other failure, 2 usage error, 3 link refused (expired),
4 network failure, 5 checksum mismatch, 6 web page received instead of a file.
Re-running the script resumes partial downloads and skips verified files.
EOF
}

say() { printf '%s\n' "$*"; }
warn() { printf '%s\n' "$*" >&2; }
die() {
    local status=$1
    shift
    printf 'Error: %s\n' "$*" >&2
    exit "$status"
}

# trim STRING: drop carriage returns and surrounding white space.
trim() {
    local s=$1
    s=${s//$'\r'/}
    s=${s#"${s%%[![:space:]]*}"}
    s=${s%"${s##*[![:space:]]}"}
    printf '%s' "$s"
}

lower() { printf '%s' "$1" | LC_ALL=C tr '[:upper:]' '[:lower:]'; }

file_size() {
    if [ -f "$1" ]; then
        wc -c <"$1" | tr -d ' \t'
    else
        echo 0
    fi
}

# ask PROMPT VAR: read one line into VAR; fails at end of input with nothing read.
ask() {
    local answer=""
    if [ -t 0 ]; then
        read -r -p "$1" answer || [ -n "$answer" ] || return 1
    else
        read -r answer || [ -n "$answer" ] || return 1
    fi
    printf -v "$2" '%s' "$answer"
}

# ---------------------------------------------------------------- arguments

while [ $# -gt 0 ]; do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --url | --models | --target)
            [ $# -ge 2 ] || die $EXIT_USAGE "$1 needs a value (see --help)"
            case $1 in
                --url) PRESIGNED_URL=$2 ;;
                --models) MODEL_SIZE=$2 ;;
                --target) TARGET_FOLDER=$2 ;;
            esac
            shift 2
            ;;
        --url=*)
            PRESIGNED_URL=${1#--url=}
            shift
            ;;
        --models=*)
            MODEL_SIZE=${1#--models=}
            shift
            ;;
        --target=*)
            TARGET_FOLDER=${1#--target=}
            shift
            ;;
        *) die $EXIT_USAGE "unknown argument '$1' (see --help)" ;;
    esac
done

# ---------------------------------------------------------------- the URL

if [ -z "$(trim "${PRESIGNED_URL:-}")" ]; then
    PRESIGNED_URL=""
    ask "Enter the URL from email: " PRESIGNED_URL || true
    if [ -z "$(trim "$PRESIGNED_URL")" ]; then
        if [ -t 0 ]; then
            die $EXIT_USAGE "no URL entered: paste the download URL from Meta's email."
        fi
        die $EXIT_USAGE "no download URL given and there is no terminal to ask for one: pass --url 'URL' or set PRESIGNED_URL (and --models / MODEL_SIZE)."
    fi
fi

PRESIGNED_URL=$(trim "$PRESIGNED_URL")
# Pasted with quotes or mail-style angle brackets around it? Drop them.
case $PRESIGNED_URL in
    \"*\" | \'*\' | \<*\>)
        PRESIGNED_URL=${PRESIGNED_URL#?}
        PRESIGNED_URL=${PRESIGNED_URL%?}
        ;;
esac
case $PRESIGNED_URL in
    http://* | https://*) ;;
    *) die $EXIT_USAGE "the URL should start with https:// : paste the whole URL from Meta's email (it looks like https://download.llamameta.net/*?Policy=...&Signature=...&Key-Pair-Id=...)." ;;
esac
case $PRESIGNED_URL in
    *'*'*) ;;
    *) die $EXIT_USAGE "the URL has no '*' in it: paste the URL exactly as written in Meta's email (https://download.llamameta.net/*?Policy=...), not the address of a page opened in a browser." ;;
esac
URL_BEFORE_STAR=${PRESIGNED_URL%%\**}
URL_AFTER_STAR=${PRESIGNED_URL#*\*}


# ---------------------------------------------------------------- the models

# model_info NAME: set MODEL_DIR, MODEL_SHARDS, MODEL_LABEL and MODEL_KB (the
# approximate disk space in KiB) for a lower-case model name; fail if unknown.
model_info() {
    case $1 in
        7b) MODEL_DIR=llama-2-7b MODEL_SHARDS=1 MODEL_LABEL=7B ;;
        7b-chat) MODEL_DIR=llama-2-7b-chat MODEL_SHARDS=1 MODEL_LABEL=7B-chat ;;
        13b) MODEL_DIR=llama-2-13b MODEL_SHARDS=2 MODEL_LABEL=13B ;;
        13b-chat) MODEL_DIR=llama-2-13b-chat MODEL_SHARDS=2 MODEL_LABEL=13B-chat ;;
        70b) MODEL_DIR=llama-2-70b MODEL_SHARDS=8 MODEL_LABEL=70B ;;
        70b-chat) MODEL_DIR=llama-2-70b-chat MODEL_SHARDS=8 MODEL_LABEL=70B-chat ;;
        *) return 1 ;;
    esac
    case $1 in
        7b*) MODEL_KB=12260000 ;;    # 1 x 12.55 GB
        13b*) MODEL_KB=23680000 ;;   # 2 x 12.12 GB
        70b*) MODEL_KB=125480000 ;;  # 8 x 16.06 GB
    esac
    return 0
}

# parse_models LIST: set MODELS to the space-separated lower-case names, or
# print what is wrong and fail. Empty means all six.
parse_models() {
    local input rest item key unknown=""
    MODELS=""
    input=$(trim "$1")
    [ -n "$input" ] || input=$ALL_MODELS
    rest="$input,"
    while [ -n "$rest" ]; do
        item=$(trim "${rest%%,*}")
        rest=${rest#*,}
        [ -n "$item" ] || continue
        key=$(lower "$item")
        case $key in
            llama-2-*) key=${key#llama-2-} ;;
        esac
        if model_info "$key"; then
            case " $MODELS " in
                *" $key "*) ;;
                *) MODELS="${MODELS:+$MODELS }$key" ;;
            esac
        else
            unknown="${unknown:+$unknown, }'$item'"
        fi
    done
    if [ -n "$unknown" ]; then
        warn "Error: unknown model name(s): $unknown."
        warn "Valid names: $ALL_MODELS (comma-separated, without spaces; nothing means all six)."
        return 1
    fi
    if [ -z "$MODELS" ]; then
        warn "Error: no model names in '$input'. Valid names: $ALL_MODELS."
        return 1
    fi
    return 0
}

MODELS_PROMPT="Enter the list of models to download without spaces ($ALL_MODELS), or press Enter for all: "
if [ -n "${MODEL_SIZE+set}" ]; then
    parse_models "$MODEL_SIZE" || exit $EXIT_USAGE
else
    while :; do
        MODEL_SIZE=""
        if ! ask "$MODELS_PROMPT" MODEL_SIZE; then
            say "No model list given: downloading all six models ($ALL_MODELS)."
            MODEL_SIZE=""
        fi
        parse_models "$MODEL_SIZE" && break
        [ -t 0 ] || exit $EXIT_USAGE
    done
fi

# ---------------------------------------------------------------- tools and settings

DOWNLOADER=$(lower "$(trim "${DOWNLOADER:-}")")
case $DOWNLOADER in
    "")
        if command -v curl >/dev/null 2>&1; then
            DOWNLOADER=curl
        elif command -v wget >/dev/null 2>&1; then
            DOWNLOADER=wget
        else
            die $EXIT_USAGE "neither curl nor wget is installed: install one of them (e.g. 'sudo apt-get install curl' or 'brew install curl') and run download.sh again."
        fi
        ;;
    curl | wget)
        command -v "$DOWNLOADER" >/dev/null 2>&1 ||
            die $EXIT_USAGE "DOWNLOADER=$DOWNLOADER, but $DOWNLOADER is not installed."
        ;;
    *) die $EXIT_USAGE "DOWNLOADER must be 'curl' or 'wget', not '$DOWNLOADER'." ;;
esac

[ -f "$VERIFIER" ] ||
    die $EXIT_USAGE "$VERIFIER is missing: run download.sh from a checkout of the repository (it verifies the downloads with llama/checkpoints/checklist.py)."
# Find a Python 3 and call the interpreter itself rather than a wrapper (pyenv
# shims cost ~0.1 s a call), with -S: the verifier needs only the standard library.
PYTHON_EXE=""
for candidate in ${PYTHON:-} python3 python; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    PYTHON_EXE=$("$candidate" -S -c 'import sys
if sys.version_info[0] < 3: sys.exit(1)
print(sys.executable or "")' 2>/dev/null) || continue
    [ -n "$PYTHON_EXE" ] && [ -x "$PYTHON_EXE" ] || PYTHON_EXE=$candidate
    break
done
[ -n "$PYTHON_EXE" ] ||
    die $EXIT_USAGE "Python 3 is needed to verify the downloads (python3 was not found): install it, or set PYTHON to its path."

# verifier ARGS...: run llama/checkpoints/checklist.py.
verifier() { "$PYTHON_EXE" -S "$VERIFIER" "$@"; }

# number NAME VALUE: fail unless VALUE is a non-negative integer.
number() {
    case $2 in
        '' | *[!0-9]*) die $EXIT_USAGE "$1 must be a whole number of 0 or more, not '$2'." ;;
    esac
}
RETRIES=${DOWNLOAD_RETRIES:-4}
RETRY_DELAY=${DOWNLOAD_RETRY_DELAY:-2}
STALL_TIMEOUT=${DOWNLOAD_TIMEOUT:-120}
number DOWNLOAD_RETRIES "$RETRIES"
number DOWNLOAD_RETRY_DELAY "$RETRY_DELAY"
number DOWNLOAD_TIMEOUT "$STALL_TIMEOUT"
[ "$STALL_TIMEOUT" -gt 0 ] || STALL_TIMEOUT=120
CONNECT_TIMEOUT=30
[ "$STALL_TIMEOUT" -lt "$CONNECT_TIMEOUT" ] && CONNECT_TIMEOUT=$STALL_TIMEOUT

TARGET_FOLDER=$(trim "${TARGET_FOLDER:-}")
[ -n "$TARGET_FOLDER" ] || TARGET_FOLDER=.
mkdir -p "$TARGET_FOLDER" || die $EXIT_FAILURE "cannot create the target folder '$TARGET_FOLDER'."
[ -w "$TARGET_FOLDER" ] || die $EXIT_FAILURE "the target folder '$TARGET_FOLDER' is not writable."

SHOW_PROGRESS=0
[ -t 2 ] && SHOW_PROGRESS=1
WGET_SHOWS_PROGRESS=0 # wget 1.16+ can show just a progress bar while logging to a file
if [ "$DOWNLOADER" = wget ] && [ "$SHOW_PROGRESS" = 1 ] &&
    LC_ALL=C wget --help 2>/dev/null | grep -q -- '--show-progress'; then
    WGET_SHOWS_PROGRESS=1
fi

WORK_TMP=$(mktemp -d 2>/dev/null || mktemp -d -t llama-download) ||
    die $EXIT_FAILURE "cannot create a temporary folder."
trap 'rm -rf "$WORK_TMP"' EXIT
trap 'warn ""; warn "Interrupted. Partial downloads are kept as *.part files: run download.sh again to resume them."; exit 130' INT TERM

# ---------------------------------------------------------------- disk space

check_space() {
    local need=0 have avail m
    for m in $MODELS; do
        model_info "$m"
        have=0
        if [ -d "$TARGET_FOLDER/$MODEL_DIR" ]; then
            have=$(du -sk "$TARGET_FOLDER/$MODEL_DIR" 2>/dev/null | awk '{print $1}')
            case $have in '' | *[!0-9]*) have=0 ;; esac
        fi
        [ "$have" -lt "$MODEL_KB" ] && need=$((need + MODEL_KB - have))
    done
    avail=$(df -Pk "$TARGET_FOLDER" 2>/dev/null | awk 'NR == 2 {print $4}')
    case $avail in '' | *[!0-9]*) return 0 ;; esac
    if [ "$avail" -lt "$need" ]; then
        warn "Warning: the chosen models need about $((need / 1000000)) GB more, but only about $((avail / 1000000)) GB are free in '$TARGET_FOLDER'. The download will stop when the disk is full."
    fi
    return 0
}
check_space

# ---------------------------------------------------------------- one transfer

# run_downloader URL PART: one attempt to fetch URL into PART, resuming it.
# Sets DL_RC (the tool's exit status), HTTP_CODE, CONTENT_TYPE and DL_LOG.
run_downloader() {
    local url=$1 part=$2 meta="$WORK_TMP/meta"
    CURRENT_PART=$part
    DL_LOG="$WORK_TMP/log"
    : >"$DL_LOG"
    : >"$meta"
    HTTP_CODE=000
    CONTENT_TYPE=""
    if [ "$DOWNLOADER" = curl ]; then
        set -- curl -L --fail -C - --connect-timeout "$CONNECT_TIMEOUT" \
            --speed-limit 1 --speed-time "$STALL_TIMEOUT" \
            -o "$part" -w '%{http_code} %{content_type}\n'
        if [ "$SHOW_PROGRESS" = 1 ]; then
            set -- "$@" --progress-bar "$url"
            "$@" 2>&1 >"$meta" | tee "$DL_LOG" >&2
            DL_RC=${PIPESTATUS[0]}
        else
            "$@" -sS "$url" >"$meta" 2>"$DL_LOG"
            DL_RC=$?
        fi
        read -r HTTP_CODE CONTENT_TYPE <"$meta" || true
        HTTP_CODE=${HTTP_CODE:-000}
    else
        # The log (-o) is parsed below; only a progress bar goes to the terminal.
        set -- wget -c -O "$part" -o "$DL_LOG" --tries=1 --connect-timeout="$CONNECT_TIMEOUT" \
            --dns-timeout="$CONNECT_TIMEOUT" --read-timeout="$STALL_TIMEOUT"
        if [ "$SHOW_PROGRESS" = 1 ] && [ "$WGET_SHOWS_PROGRESS" = 1 ]; then
            set -- "$@" --show-progress --progress=bar:force
        else
            set -- "$@" --progress=dot:giga
        fi
        LC_ALL=C "$@" "$url" </dev/null
        DL_RC=$?
        HTTP_CODE=$(sed -n 's/.*awaiting response\.\.\. \([0-9][0-9][0-9]\).*/\1/p' "$DL_LOG" | tail -n 1)
        HTTP_CODE=${HTTP_CODE:-000}
        CONTENT_TYPE=$(sed -n 's/^Length:.*\[\(.*\)\].*$/\1/p' "$DL_LOG" | tail -n 1)
    fi
}

# classify: turn DL_RC / HTTP_CODE into OUTCOME (ok, restart, retry, refused,
# notfound, network, fatal) and REASON (words for the user).
classify() {
    OUTCOME=fatal
    REASON=""
    local detail=""
    if [ "$DOWNLOADER" = curl ]; then
        [ "$DL_RC" = 0 ] || detail=$(grep -o 'curl: ([0-9]*).*' "$DL_LOG" | tail -n 1)
        case $DL_RC in
            0) OUTCOME=ok ;;
            22) classify_http ;;
            33)
                OUTCOME=restart
                REASON="the server cannot resume this file"
                ;;
            6)
                OUTCOME=network
                REASON="the server's host name could not be resolved (no connection or DNS failure)"
                ;;
            7)
                OUTCOME=network
                REASON="could not connect to the server (connection refused or network unreachable)"
                ;;
            28)
                OUTCOME=network
                REASON="the connection timed out"
                ;;
            16 | 18 | 52 | 55 | 56 | 92)
                OUTCOME=network
                REASON="the connection was cut off during the transfer"
                ;;
            35)
                OUTCOME=network
                REASON="the secure (TLS) connection could not be set up"
                ;;
            23) REASON="could not write the file: is the disk full, or the folder not writable?" ;;
            3) REASON="the URL is malformed: paste it again exactly as written in the email" ;;
            51 | 58 | 59 | 60 | 77 | 83) REASON="the server's TLS certificate could not be verified ($detail)" ;;
            *)
                OUTCOME=network
                REASON="curl failed with status $DL_RC${detail:+ ($detail)}"
                ;;
        esac
    else
        [ "$DL_RC" = 0 ] || detail=$(grep -iE 'failed|unable|error|timed out|closed|refused' "$DL_LOG" | tail -n 1)
        case $DL_RC in
            0) OUTCOME=ok ;;
            6 | 8) classify_http ;;
            4)
                OUTCOME=network
                if grep -qiE 'unable to resolve|failed: Name or service|failed: nodename|Temporary failure in name' "$DL_LOG"; then
                    REASON="the server's host name could not be resolved (no connection or DNS failure)"
                elif grep -qiE 'refused|unreachable' "$DL_LOG"; then
                    REASON="could not connect to the server (connection refused or network unreachable)"
                elif grep -qi 'timed out' "$DL_LOG"; then
                    REASON="the connection timed out"
                elif grep -qiE 'closed at byte|read error' "$DL_LOG"; then
                    REASON="the connection was cut off during the transfer"
                else
                    REASON="network failure${detail:+ ($detail)}"
                fi
                ;;
            3) REASON="could not write the file: is the disk full, or the folder not writable?" ;;
            2) REASON="the URL is malformed: paste it again exactly as written in the email" ;;
            5) REASON="the secure (TLS) connection failed or the server's certificate could not be verified${detail:+ ($detail)}" ;;
            *)
                OUTCOME=network
                REASON="wget failed with status $DL_RC${detail:+ ($detail)}"
                ;;
        esac
    fi
}

classify_http() {
    case $HTTP_CODE in
        416)
            # Asked to resume a file that is already whole: let the checksum decide.
            if [ "$(file_size "$CURRENT_PART")" != 0 ]; then
                OUTCOME=ok
            else
                REASON="the server answered HTTP 416"
            fi
            ;;
        401 | 403)
            OUTCOME=refused
            REASON="HTTP $HTTP_CODE"
            ;;
        404 | 410)
            OUTCOME=notfound
            REASON="HTTP $HTTP_CODE"
            ;;
        408 | 429 | 5??)
            OUTCOME=retry
            REASON="the server answered HTTP $HTTP_CODE"
            ;;
        *) REASON="the server answered HTTP $HTTP_CODE" ;;
    esac
}

# fetch REL PART: download the bucket file REL into PART, resuming and retrying;
# exits with a message when it cannot.
fetch() {
    local rel=$1 part=$2 url attempt=1 tries delay=$RETRY_DELAY restarted=0 partial
    url="$URL_BEFORE_STAR$rel$URL_AFTER_STAR" # the '*' replaced by the file's path
    tries=$((RETRIES + 1))
    while :; do
        run_downloader "$url" "$part"
        classify
        case $OUTCOME in
            ok) return 0 ;;
            restart)
                if [ "$restarted" = 0 ]; then
                    restarted=1
                    say "The server cannot resume $rel; downloading it from the start."
                    rm -f "$part"
                    continue
                fi
                OUTCOME=network
                ;;
        esac
        case $OUTCOME in
            network | retry)
                if [ "$attempt" -lt "$tries" ]; then
                    attempt=$((attempt + 1))
                    say "$rel: $REASON; retrying in ${delay}s (try $attempt of $tries)..."
                    sleep "$delay"
                    delay=$((delay * 2))
                    continue
                fi
                ;;
        esac
        break
    done

    # Out of luck. Keep a partial download (a new run, even with a new link,
    # resumes it); drop an empty one.
    if [ "$tries" = 1 ]; then tries="1 try"; else tries="$tries tries"; fi
    partial=$(file_size "$part")
    if [ "$partial" = 0 ]; then
        rm -f "$part"
    fi
    case $OUTCOME in
        refused)
            die $EXIT_REFUSED "the download link was refused ($REASON) while fetching $rel: presigned URLs expire after 24 hours and allow a limited number of downloads; request a new link ($NEW_LINK_PAGE) and run download.sh again with it. Files already downloaded are verified and skipped, partial ones resume. (Also make sure the whole URL was pasted.)"
            ;;
        notfound)
            die $EXIT_FAILURE "the server has no $rel ($REASON): check that the URL was pasted whole and that your link covers this model."
            ;;
        retry)
            die $EXIT_NETWORK "$REASON for $rel, after $tries. The server may be busy: try again later; running download.sh again resumes where it stopped."
            ;;
        network)
            if [ "$partial" = 0 ]; then
                die $EXIT_NETWORK "network failure while downloading $rel: $REASON (after $tries). Check your internet connection (and proxy); running download.sh again resumes where it stopped."
            fi
            die $EXIT_NETWORK "network failure while downloading $rel: $REASON (after $tries). Check your internet connection (and proxy); running download.sh again resumes where it stopped ($partial bytes are kept in $part)."
            ;;
        *)
            die $EXIT_FAILURE "could not download $rel: $REASON."
            ;;
    esac
}

# ---------------------------------------------------------------- one file

# looks_like_html FILE: does FILE start like a web page?
looks_like_html() {
    local start=""
    IFS= read -r -d '' -n 256 start <"$1" 2>/dev/null
    start=${start#$'\357\273\277'} # a UTF-8 byte order mark
    start=${start#"${start%%[![:space:]]*}"}
    case $start in
        [\<][\!][Dd][Oo][Cc][Tt][Yy][Pp][Ee]* | [\<][Hh][Tt][Mm][Ll]*) return 0 ;;
    esac
    return 1
}

# reject_html REL PART: stop if a web page came back instead of the file.
reject_html() {
    local rel=$1 part=$2 binary=0 title
    case $rel in
        *.pth | *.model | *.chk | *.json) binary=1 ;;
    esac
    if looks_like_html "$part" ||
        { [ "$binary" = 1 ] && case $CONTENT_TYPE in *[Tt][Ee][Xx][Tt]/[Hh][Tt][Mm][Ll]*) true ;; *) false ;; esac; }; then
        title=$(head -c 4096 "$part" 2>/dev/null | LC_ALL=C tr '\n\r' '  ' |
            LC_ALL=C sed -n 's:.*<[Tt][Ii][Tt][Ll][Ee][^>]*>\([^<]*\)<.*:\1:p' | head -c 120)
        rm -f "$part"
        die $EXIT_HTML "instead of $rel the server sent a web page (HTML${CONTENT_TYPE:+, Content-Type: $CONTENT_TYPE}${title:+, titled \"$(trim "$title")\"}), not the file. The URL is probably not the download link: paste the exact URL from Meta's email (https://download.llamameta.net/*?Policy=...). A proxy, captive portal or login page may also have intercepted the download. Nothing was kept."
    fi
}

CHK_NAMES=""

# listed NAME: is NAME in CHK_NAMES (the names the current checklist lists)?
listed() {
    case "
$CHK_NAMES
" in
        *"
$1
"*) return 0 ;;
    esac
    return 1
}

# load_checklist FILE: set CHK_NAMES from FILE; fails if FILE is not a checklist.
load_checklist() {
    CHK_NAMES=$(verifier "$1" --list 2>"$WORK_TMP/chk.err")
}

FAILED=""
DOWNLOADED=0
SKIPPED=0

# get_file REL DEST [CHECKLIST | --checklist]: make sure DEST holds the bucket
# file REL. With CHECKLIST, the download must match its md5 there before it is
# renamed; with --checklist, DEST is itself a checklist and must parse (its
# names are loaded into CHK_NAMES).
get_file() {
    local rel=$1 dest=$2 chk=${3:-} name part detail size
    name=${dest##*/}
    part="$dest.part"

    if [ -f "$dest" ]; then
        if [ "$chk" = --checklist ]; then
            if load_checklist "$dest"; then
                say "Skipping $rel: already downloaded"
                rm -f "$part"
                SKIPPED=$((SKIPPED + 1))
                return 0
            fi
            say "$rel is damaged; downloading it again."
        elif [ -n "$chk" ] && listed "$name"; then
            if verifier "$chk" --only "$name" --file "$dest" >/dev/null 2>&1; then
                say "Skipping $rel: already downloaded and verified"
                rm -f "$part"
                SKIPPED=$((SKIPPED + 1))
                return 0
            fi
            say "$rel does not match its checksum in ${chk##*/}; downloading it again."
        else
            say "Skipping $rel: already downloaded"
            rm -f "$part"
            SKIPPED=$((SKIPPED + 1))
            return 0
        fi
        rm -f "$dest"
    fi

    size=$(file_size "$part")
    if [ "$size" != 0 ]; then
        say "Resuming $rel ($size bytes already downloaded)"
    else
        say "Downloading $rel"
    fi
    fetch "$rel" "$part"
    reject_html "$rel" "$part"

    if [ "$chk" = --checklist ]; then
        if ! load_checklist "$part"; then
            rm -f "$part"
            warn "$(cat "$WORK_TMP/chk.err")"
            die $EXIT_FAILURE "the downloaded $rel is not a valid checklist and was deleted; run download.sh again (if it keeps happening, request a new link)."
        fi
    elif [ -n "$chk" ]; then
        if listed "$name"; then
            if ! verifier "$chk" --only "$name" --file "$part" >/dev/null 2>"$WORK_TMP/verify.err"; then
                rm -f "$part"
                detail=$(sed -n 's/.*(\(expected md5 [0-9a-f]*, got [0-9a-f]*\)).*/\1/p' "$WORK_TMP/verify.err" | head -n 1)
                [ -n "$detail" ] || detail=$(sed -n '2s/^ *//p' "$WORK_TMP/verify.err")
                warn "Error: checksum mismatch for $rel ($detail). The corrupted download was deleted; run download.sh again to download $rel again."
                FAILED="${FAILED:+$FAILED }$rel"
                return 1
            fi
        else
            warn "Warning: $name is not listed in ${chk##*/}, so it cannot be verified."
        fi
    fi

    mv -f "$part" "$dest" || die $EXIT_FAILURE "cannot rename $part to $dest."
    DOWNLOADED=$((DOWNLOADED + 1))
    if [ -n "$chk" ] && [ "$chk" != --checklist ] && listed "$name"; then
        say "$rel: OK (md5 verified)"
    fi
    return 0
}

# get_checklist REL DEST: download a checklist and load the names it lists.
get_checklist() { get_file "$1" "$2" --checklist; }

# ---------------------------------------------------------------- the downloads

T=$TARGET_FOLDER
labels=""
for m in $MODELS; do
    model_info "$m"
    labels="${labels:+$labels,}$MODEL_LABEL"
done
say "Downloading into $(cd "$T" && pwd) with $DOWNLOADER: the tokenizer and $labels"

say "Downloading LICENSE and Acceptable Usage Policy"
get_file LICENSE "$T/LICENSE"
get_file USE_POLICY.md "$T/USE_POLICY.md"

say "Downloading tokenizer"
get_checklist tokenizer_checklist.chk "$T/tokenizer_checklist.chk"
get_file tokenizer.model "$T/tokenizer.model" "$T/tokenizer_checklist.chk" || true

for m in $MODELS; do
    model_info "$m"
    say "Downloading $MODEL_DIR"
    mkdir -p "$T/$MODEL_DIR" || die $EXIT_FAILURE "cannot create $T/$MODEL_DIR."
    get_checklist "$MODEL_DIR/checklist.chk" "$T/$MODEL_DIR/checklist.chk"

    files=""
    i=0
    while [ "$i" -lt "$MODEL_SHARDS" ]; do
        files="$files $(printf 'consolidated.%02d.pth' "$i")"
        i=$((i + 1))
    done
    files="$files params.json"
    # Anything else the checklist lists is fetched too (plain names only).
    IFS='
'
    for name in $CHK_NAMES; do
        case " $files " in *" $name "*) continue ;; esac
        case $name in
            '' | .* | */* | *[!A-Za-z0-9._-]*)
                warn "Warning: ignoring '$name' listed in $MODEL_DIR/checklist.chk (not a plain file name)."
                continue
                ;;
        esac
        files="$files $name"
    done
    IFS=$DEFAULT_IFS

    for name in $files; do
        get_file "$MODEL_DIR/$name" "$T/$MODEL_DIR/$name" "$T/$MODEL_DIR/checklist.chk" || true
    done
done

if [ -n "$FAILED" ]; then
    warn ""
    die $EXIT_CHECKSUM "these files failed md5 verification and were deleted: $FAILED. Run download.sh again to download them again (the others are kept and skipped)."
fi
say "Done: $DOWNLOADED file(s) downloaded, $SKIPPED already present; every file listed in the checklists matches its md5."
