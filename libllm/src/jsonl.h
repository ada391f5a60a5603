// Reading libllm's JSONL logs (metrics.jsonl, events.jsonl, data_sequence.jsonl): private to the
// library's sources.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "libllm/error.h"

namespace libllm::detail {

// json::parse of a file's text (a string, a stream, or iterators) that refuses nesting deeper than
// 64 levels with an Error naming `where`: nlohmann's dump() recurses once a level, so a value
// nested 100,000 deep in a corrupt or hostile file would overflow the stack when an error message
// shows it. Other syntax errors are json::parse_error, as from json::parse.
template <class Input>
nlohmann::json parse_json(Input&& input, const std::string& where) {
  const auto limit = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json&) {
    if ((event == nlohmann::json::parse_event_t::object_start || event == nlohmann::json::parse_event_t::array_start) &&
        depth >= 64)
      throw Error(where, "JSON nested deeper than 64 levels", "the file is corrupt");
    return true;
  };
  return nlohmann::json::parse(std::forward<Input>(input), limit);
}

// A JSON value as an error message shows it: as written, cut to 80 characters, when it is a scalar
// or an array or object of at most 8 scalars; else by type and size ("an array of 3 elements"):
// never a whole file's worth, nor a deep recursion.
inline std::string shown(const nlohmann::json& v) {
  bool flat = v.size() <= 8;
  if (v.is_structured())
    for (const auto& e : v) flat = flat && !e.is_structured();
  if (!flat && v.is_array()) return "an array of " + std::to_string(v.size()) + " elements";
  if (!flat) return "an object of " + std::to_string(v.size()) + " keys";
  std::string text = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (text.size() > 80) text = text.substr(0, 77) + "...";
  return text;
}

// The lines of the JSONL file `path`; a line cut by a kill -9 is left out. A missing file is an
// Error when `required`, else no lines.
inline std::vector<nlohmann::json> read_jsonl(const std::string& path, bool required) {
  std::vector<nlohmann::json> out;
  std::ifstream in(path);
  if (!in) {
    if (required) throw Error(path, "cannot open", "is this a run folder (train.run_dir)?");
    return out;
  }
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    try {
      out.push_back(nlohmann::json::parse(line));
    } catch (const nlohmann::json::exception&) {
    }
  }
  return out;
}

// Calls fn(line) for each line of the JSONL file `path` that its newline ends (a last line cut by a
// kill -9 is left out), one at a time: a data_sequence.jsonl of gigabytes is never held whole.
// Returns false when the file cannot be opened.
template <class Fn>
bool for_each_line(const std::string& path, Fn&& fn) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::string line;
  while (std::getline(in, line) && !in.eof()) fn(line);
  return true;
}

// The integer of the first `"key":` in `line`, a compact JSON object as libllm writes its logs
// (nlohmann's dump of flat lines: "step", "branch" are top-level), found without parsing the
// line; `fallback` when it has none.
inline int64_t int_field(const std::string& line, std::string_view key, int64_t fallback) {
  const std::string pattern = "\"" + std::string(key) + "\":";
  const size_t at = line.find(pattern);
  if (at == std::string::npos) return fallback;
  const char* begin = line.c_str() + at + pattern.size();
  char* end = nullptr;
  const long long v = std::strtoll(begin, &end, 10);
  return end == begin ? fallback : static_cast<int64_t>(v);
}

// Cuts a log's unfinished last line (what a failed or killed write left: bytes after the last
// newline) so that the next line appended starts a line of its own. Returns the bytes cut; a
// missing file, or one that ends with a newline, is left as it is. Only for a log no other process
// appends to meanwhile (it shrinks the file). Errors: std::filesystem::filesystem_error.
inline int64_t end_at_line(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return 0;
  const std::streamoff size = in.tellg();
  std::streamoff end = size;  // the tail [end, size) holds no newline so far
  std::vector<char> chunk(1 << 16);
  while (end > 0) {  // (backwards, a chunk at a time, to the last newline)
    const std::streamoff from = std::max<std::streamoff>(0, end - static_cast<std::streamoff>(chunk.size()));
    in.seekg(from);
    if (!in.read(chunk.data(), end - from)) return 0;
    const std::streamoff n = end - from;
    std::streamoff k = n;
    while (k > 0 && chunk[static_cast<size_t>(k - 1)] != '\n') --k;
    if (k > 0) {
      end = from + k;
      break;
    }
    end = from;
  }
  if (end == size) return 0;
  in.close();
  std::filesystem::resize_file(path, static_cast<std::uintmax_t>(end));
  return static_cast<int64_t>(size - end);
}

}  // namespace libllm::detail
