#!/bin/sh
# jargon-qa.sh -- build a small chat fine-tuning set from the Jargon File.
#
# Usage:  recipes/data/jargon-qa.sh OUT_DIR
#
# Input:  the Debian package dict-jargon (the Jargon File 4.4.7 in dictd
#         format): /usr/share/dictd/jargon.index and jargon.dict.dz (a
#         gzip-compatible dictzip file; a plain jargon.dict is used too).
#         Install with:  apt-get install --no-install-recommends dict-jargon
#         JARGON_DICT_DIR overrides /usr/share/dictd.
#
# Output: OUT_DIR/jargon.jsonl, one JSON object per line:
#           {"prompt": "What does \"foo\" mean in hacker jargon?",
#            "response": "<definition>"}
#         The question cycles deterministically through three phrasings.
#         No train/valid split: the trainer makes its own held-out split.
#
# How: entries are cut out of the dictionary exactly where the .index says
# (base64 offset/length, decoded in awk), so entries whose body has lines at
# column 0 (e.g. ADVENT) are kept whole. For each entry the header (headword
# line plus pronunciation/part-of-speech lines, up to the first blank line)
# is dropped, whitespace is collapsed to single spaces, {cross-reference}
# braces around known headwords are removed, soft hyphens are dropped, and the
# text is cut to at most JARGON_MAXLEN bytes (default 400) at a sentence end
# when one falls in the last three quarters of that span (not after a sense
# number, part-of-speech tag or common abbreviation, nor inside a double
# quotation), else at a word boundary with "..." appended. dictd metadata
# entries (headwords starting with "00") and definitions shorter than 20
# bytes are skipped. UTF-8 is passed through unchanged; backslash, double
# quote and control characters are JSON-escaped. The output is written to a
# temporary file and moved into place only when complete.
#
# Needs only POSIX sh, gzip, coreutils and awk (mawk is fine).

set -eu

if [ "$#" -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
out_dir=$1
dict_dir=${JARGON_DICT_DIR:-/usr/share/dictd}
maxlen=${JARGON_MAXLEN:-400}
case $maxlen in
    ''|*[!0-9]*) echo "$0: JARGON_MAXLEN must be a positive integer" >&2; exit 2 ;;
esac
if [ "$maxlen" -lt 40 ]; then
    echo "$0: JARGON_MAXLEN must be at least 40" >&2
    exit 2
fi

index_file=$dict_dir/jargon.index
install_hint="install it with: apt-get install --no-install-recommends dict-jargon"
if [ ! -r "$index_file" ]; then
    echo "$0: missing $index_file (package dict-jargon); $install_hint" >&2
    exit 1
fi
if [ -r "$dict_dir/jargon.dict.dz" ]; then
    dict_file=$dict_dir/jargon.dict.dz
    decompress="gzip -dc"
elif [ -r "$dict_dir/jargon.dict" ]; then
    dict_file=$dict_dir/jargon.dict
    decompress="cat"
else
    echo "$0: missing $dict_dir/jargon.dict.dz (package dict-jargon); $install_hint" >&2
    exit 1
fi

mkdir -p "$out_dir"
out_file=$out_dir/jargon.jsonl
tmp_json=$(mktemp "$out_dir/.jargon.jsonl.XXXXXX")
tmp_text=$(mktemp "$out_dir/.jargon.dict.XXXXXX")
cleanup() { rm -f "$tmp_json" "$tmp_text"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Decompress to a file (not a pipe) so a gzip failure stops the script:
# POSIX sh has no pipefail.
$decompress "$dict_file" > "$tmp_text"

# LC_ALL=C: lengths and offsets are in bytes, matching the dictd index.
LC_ALL=C awk -v maxlen="$maxlen" -v prog="$0" '
function die(msg) {
    printf "%s: %s\n", prog, msg > "/dev/stderr"
    failed = 1
    exit 1
}
function b64(s,    i, d, v) {
    v = 0
    for (i = 1; i <= length(s); i++) {
        d = index(B64, substr(s, i, 1))
        if (d == 0) die("bad base64 number \"" s "\" in index line " FNR)
        v = v * 64 + d - 1
    }
    return v
}
# Replace every occurrence of the literal string f in s by t.
function repl(s, f, t,    out, p) {
    out = ""
    while ((p = index(s, f)) > 0) {
        out = out substr(s, 1, p - 1) t
        s = substr(s, p + length(f))
    }
    return out s
}
function trim(s) {
    sub(/^ +/, "", s)
    sub(/ +$/, "", s)
    return s
}
function jesc(s,    i) {
    s = repl(s, "\\", "\\\\")
    s = repl(s, "\"", "\\\"")
    for (i = 1; i < 32; i++)
        if (index(s, CTRL[i]) > 0)
            s = repl(s, CTRL[i], sprintf("\\u%04x", i))
    return s
}
# {foo} -> foo when foo names an entry; other braces (C code etc.) stay.
function unxref(s,    out, inner, key) {
    out = ""
    while (match(s, /\{[^{};]+\}/)) {
        inner = trim(substr(s, RSTART + 1, RLENGTH - 2))
        key = tolower(inner)
        if (key in HEAD) {
            out = out substr(s, 1, RSTART - 1) inner
        } else {
            key = repl(key, " ", "")
            if (key in HEAD)
                out = out substr(s, 1, RSTART - 1) repl(inner, " ", "")
            else
                out = out substr(s, 1, RSTART + RLENGTH - 1)
        }
        s = substr(s, RSTART + RLENGTH)
    }
    return out s
}
# Is the word ending at a "." a sense number, initial or abbreviation?
function noend(w) {
    sub(/^[(\[]+/, "", w)
    if (substr(w, 1, 3) == LSQUO || substr(w, 1, 3) == LDQUO) w = substr(w, 4)
    if (w ~ /^[0-9]+\.$/ || w ~ /^[A-Za-z]\.$/) return 1
    w = tolower(w)
    # abbreviations, and part-of-speech tags that open a new sense ("2. vt.")
    if (w ~ /^(e\.g|i\.e|vs|cf|viz|etc|mr|mrs|ms|dr|st|mt|jr|sr|inc|ltd|co|no|u\.s|approx|esp|orig|ca)\.$/) return 1
    if (w ~ /^(n|v|vi|vt|adj|adv|pl|interj|excl|prep|conj|pron|obs|abbrev|prob|syn|alt|var)\.$/) return 1
    return 0
}
# Cut s to at most lim bytes, preferably at a sentence end that is not
# inside a double quotation.
function cut(s, lim,    best, p, c, ws, e, t, qd, d) {
    if (length(s) <= lim) return s
    best = 0
    ws = 1
    qd = 0
    t = substr(s, 1, lim + 1)
    for (p = 1; p <= lim; p++) {
        c = substr(t, p, 1)
        if (c == " ") { ws = p + 1; continue }
        if (c == "\342") {
            if (substr(t, p, 3) == LDQUO) qd++
            else if (substr(t, p, 3) == RDQUO && qd > 0) qd--
            continue
        }
        if (c != "." && c != "?" && c != "!") continue
        e = p
        d = qd
        if (substr(t, e + 1, 3) == RDQUO) { e += 3; if (d > 0) d-- }
        else if (substr(t, e + 1, 3) == RSQUO) e += 3
        else if (substr(t, e + 1, 1) == ")" || substr(t, e + 1, 1) == "\"") e += 1
        if (e > lim || substr(t, e + 1, 1) != " " || d > 0) continue
        if (c == "." && noend(substr(t, ws, p - ws + 1))) continue
        best = e
    }
    if (best >= lim / 4) return substr(s, 1, best)
    # No usable sentence end: cut at the last space, mark the cut.
    for (p = lim - 2; p > lim / 2; p--)
        if (substr(s, p, 1) == " ") break
    c = substr(s, p, 1)
    s = substr(s, 1, p - 1)
    if (c != " ") sub(/[\200-\377]+$/, "", s) # no space found: no split UTF-8
    sub(/[ ,;:(-]+$/, "", s)
    return s "..."
}
function flush(    i, n, disp, body, q) {
    if (!inentry) return
    inentry = 0
    if (substr(ihead, 1, 2) == "00") return
    disp = trim(L[1])
    gsub(/[ \t\r\f\v]+/, " ", disp)
    if (disp == "") disp = ihead
    # Header = line 1 plus following non-blank lines (pronunciation, part
    # of speech); the body starts after the first blank line.
    for (i = 2; i <= nl && L[i] !~ /^[ \t\r]*$/; i++) ;
    body = ""
    for (; i <= nl; i++) body = body " " L[i]
    gsub(/[ \t\r\n\f\v]+/, " ", body)
    body = repl(body, SHY, "")
    body = trim(unxref(trim(body)))
    if (length(body) < 20) { short++; return }
    body = cut(body, maxlen)
    q = nout % 3
    if (q == 0) q = "What does \"" disp "\" mean in hacker jargon?"
    else if (q == 1) q = "In the Jargon File, what is meant by \"" disp "\"?"
    else q = "Explain the hacker slang term \"" disp "\"."
    printf "{\"prompt\": \"%s\", \"response\": \"%s\"}\n", jesc(q), jesc(body)
    nout++
}
BEGIN {
    B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    for (i = 1; i < 32; i++) CTRL[i] = sprintf("%c", i)
    SHY = "\302\255"       # U+00AD soft hyphen
    RDQUO = "\342\200\235" # U+201D
    RSQUO = "\342\200\231" # U+2019
    LDQUO = "\342\200\234" # U+201C
    LSQUO = "\342\200\230" # U+2018
    FS = "\t"
    fileno = 0
    pos = 0
}
FNR == 1 { fileno++ }
fileno == 1 {
    if (NF < 3) die("malformed index line " FNR ": " $0)
    off = b64($2)
    if (off in START) die("two index entries at offset " off)
    START[off] = $1
    LEN[off] = b64($3)
    HEAD[tolower($1)] = 1
    nidx++
    next
}
{
    if (pos in START) {
        flush()
        inentry = 1
        ihead = START[pos]
        iend = pos + LEN[pos]
        nl = 0
        found++
    }
    if (inentry && pos < iend) L[++nl] = $0
    pos += length($0) + 1
}
END {
    if (failed) exit 1
    flush()
    if (nidx == 0) die("empty index")
    if (found != nidx)
        die("only " found " of " nidx " index offsets fall on line starts; unexpected dictionary format")
    printf "%s: %d pairs from %d index entries (%d too short)\n", prog, nout, nidx, short > "/dev/stderr"
    if (nout == 0) die("no pairs written")
}
' "$index_file" "$tmp_text" > "$tmp_json"

chmod 0644 "$tmp_json"
mv -f "$tmp_json" "$out_file"
echo "$0: wrote $out_file" >&2
