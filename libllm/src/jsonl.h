// Reading libllm's JSONL logs (metrics.jsonl, events.jsonl, data_sequence.jsonl): private to the
// library's sources.
#pragma once

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "libllm/error.h"

namespace libllm::detail {

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

}  // namespace libllm::detail
