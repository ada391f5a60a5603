#include "libllm/config.h"

#include <yaml-cpp/yaml.h>
#if __has_include(<yaml-cpp/depthguard.h>)  // (yaml-cpp >= 0.7)
#include <yaml-cpp/depthguard.h>
#define LIBLLM_YAML_DEPTH_GUARD 1
#endif

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "libllm/error.h"

namespace libllm {
namespace {

std::string join(const std::vector<std::string>& v, const char* sep) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? sep : "") + v[i];
  return s;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1])});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string unknown_key_hint(const std::string& key, const std::vector<std::string>& valid) {
  std::string near = nearest_key(key, valid);
  std::string hint = near.empty() ? "" : "did you mean '" + near + "'? ";
  return hint + "valid keys: " + join(valid, ", ");
}

std::string format_double(double v) {
  // The shortest of 15..17 significant digits that reads back as exactly v.
  std::string s;
  for (int precision = 15; precision <= 17; ++precision) {
    std::ostringstream os;
    os.precision(precision);
    os << v;
    s = os.str();
    if (std::stod(s) == v) break;
  }
  // Keep floats recognisable as floats in YAML (1 -> 1.0).
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

std::string format_bound(double v) {
  if (std::floor(v) == v && std::fabs(v) < 1e15) return std::to_string(static_cast<int64_t>(v));
  std::ostringstream os;
  os << v;
  return os.str();
}

// Converts a YAML node into the text form that Field::set_from_text takes.
std::string node_text(const YAML::Node& node, const std::string& where, const Field& f) {
  if (node.IsScalar() && f.kind() == Field::Kind::StringList) {  // one string: itself, never re-read as YAML
    YAML::Emitter out;
    out << YAML::Flow << YAML::BeginSeq << YAML::DoubleQuoted << node.Scalar() << YAML::EndSeq;
    return out.c_str();
  }
  if (node.IsScalar()) return node.Scalar();
  if (node.IsNull() && f.kind() == Field::Kind::String)
    throw Error(where, "has no value", "quote an empty string (\"\") or remove the key for its default");
  if (node.IsNull()) return "";
  if (node.IsSequence() && (f.kind() == Field::Kind::StringList || f.kind() == Field::Kind::IntList)) {
    YAML::Emitter out;
    out << YAML::Flow << node;
    return out.c_str();
  }
  throw Error(where, "expected " + f.allowed() + ", got a " +
                         (node.IsSequence() ? "list" : "mapping"));
}

}  // namespace

std::optional<double> parse_number(const std::string& text) {
  // Digits with at most one '.', then an optional exponent; an optional sign before each.
  size_t i = 0, n = text.size();
  auto digits = [&]() {
    const size_t from = i;
    while (i < n && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
    return i - from;
  };
  if (i < n && (text[i] == '+' || text[i] == '-')) ++i;
  size_t mantissa = digits();
  if (i < n && text[i] == '.') {
    ++i;
    mantissa += digits();
  }
  if (mantissa == 0) return std::nullopt;
  if (i < n && (text[i] == 'e' || text[i] == 'E')) {
    ++i;
    if (i < n && (text[i] == '+' || text[i] == '-')) ++i;
    if (digits() == 0) return std::nullopt;
  }
  if (i != n) return std::nullopt;
  try {
    const double v = std::stod(text);
    if (std::isfinite(v)) return v;
  } catch (const std::exception&) {  // (out of range)
  }
  return std::nullopt;
}

std::optional<int64_t> parse_int(const std::string& text) {
  const std::optional<double> d = parse_number(text);
  if (!d || std::floor(*d) != *d) return std::nullopt;
  if (text.find_first_of(".eE") == std::string::npos) {  // exact, past 2^53 too
    try {
      return std::stoll(text, nullptr, 10);
    } catch (const std::exception&) {
      return std::nullopt;
    }
  }
  if (std::fabs(*d) > 9e18) return std::nullopt;
  return static_cast<int64_t>(*d);
}

std::string nearest_key(const std::string& key, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_d = std::string::npos;
  for (const auto& c : candidates) {
    size_t d = edit_distance(key, c);
    if (d < best_d) best_d = d, best = c;
  }
  // Close enough to be a typo: at most a third of the longer name changed.
  size_t limit = std::max<size_t>(2, std::max(key.size(), best.size()) / 3);
  return best_d <= limit ? best : "";
}

std::string Field::allowed() const {
  switch (kind_) {
    case Kind::Int:
    case Kind::Float: {
      std::string s = kind_ == Kind::Int ? "an integer" : "a number";
      if (has_min_ && has_max_) return s + " in [" + format_bound(min_) + ", " + format_bound(max_) + "]";
      if (has_min_) return s + " >= " + format_bound(min_);
      if (has_max_) return s + " <= " + format_bound(max_);
      return s;
    }
    case Kind::Bool: return "true or false";
    case Kind::String: return choices_.empty() ? "a string" : "one of: " + join(choices_, ", ");
    case Kind::StringList: return "a list of strings";
    case Kind::IntList: {
      std::string s = "a list of integers";
      if (has_min_) s += " >= " + format_bound(min_);
      if (has_max_) s += " <= " + format_bound(max_);
      return s;
    }
  }
  return "";
}

void Field::set_from_text(const std::string& text, const std::string& where) {
  auto bad = [&]() { return Error(where, "expected " + allowed() + ", got '" + text + "'"); };
  switch (kind_) {
    case Kind::Int: {
      const std::optional<int64_t> v = parse_int(text);
      if (!v) throw bad();
      *static_cast<int64_t*>(target_) = *v;
      break;
    }
    case Kind::Float: {
      const std::optional<double> v = parse_number(text);
      if (!v) throw bad();
      *static_cast<double*>(target_) = *v;
      break;
    }
    case Kind::Bool: {
      std::string t = text;
      std::transform(t.begin(), t.end(), t.begin(), ::tolower);
      if (t == "true" || t == "yes" || t == "on") *static_cast<bool*>(target_) = true;
      else if (t == "false" || t == "no" || t == "off") *static_cast<bool*>(target_) = false;
      else throw bad();
      break;
    }
    case Kind::String:
      *static_cast<std::string*>(target_) = text;
      break;
    case Kind::StringList: {
      std::vector<std::string> out;
      YAML::Node n;
      try {
        n = YAML::Load(text);
      } catch (...) {
        throw bad();
      }
      if (n.IsNull()) {
      } else if (n.IsScalar()) {
        out.push_back(n.Scalar());
      } else if (n.IsSequence()) {
        for (const auto& e : n) {
          if (!e.IsScalar()) throw bad();
          out.push_back(e.Scalar());
        }
      } else {
        throw bad();
      }
      *static_cast<std::vector<std::string>*>(target_) = out;
      break;
    }
    case Kind::IntList: {
      std::vector<int64_t> out;
      YAML::Node n;
      try {
        n = YAML::Load(text);
      } catch (...) {
        throw bad();
      }
      std::vector<std::string> items;
      if (n.IsScalar()) items.push_back(n.Scalar());
      else if (n.IsSequence())
        for (const auto& e : n) {
          if (!e.IsScalar()) throw bad();
          items.push_back(e.Scalar());
        }
      else if (!n.IsNull()) throw bad();
      for (const auto& item : items) {
        const std::optional<int64_t> v = parse_int(item);
        if (!v || item.find_first_of(".eE") != std::string::npos) throw bad();  // (plain integers only)
        out.push_back(*v);
      }
      *static_cast<std::vector<int64_t>*>(target_) = out;
      break;
    }
  }
  check(where);
}

void Field::check(const std::string& where) const {
  if (kind_ == Kind::Int || kind_ == Kind::Float) {
    double v = kind_ == Kind::Int ? static_cast<double>(*static_cast<const int64_t*>(target_))
                                  : *static_cast<const double*>(target_);
    if ((has_min_ && v < min_) || (has_max_ && v > max_))
      throw Error(where, "expected " + allowed() + ", got " + to_text());
  }
  if (kind_ == Kind::IntList)
    for (int64_t v : *static_cast<const std::vector<int64_t>*>(target_))
      if ((has_min_ && v < min_) || (has_max_ && v > max_))
        throw Error(where, "expected " + allowed() + ", got " + to_text());
  if (kind_ == Kind::String && !choices_.empty()) {
    const auto& v = *static_cast<const std::string*>(target_);
    if (std::find(choices_.begin(), choices_.end(), v) == choices_.end())
      throw Error(where, "expected " + allowed() + ", got '" + v + "'",
                  nearest_key(v, choices_).empty() ? "" : "did you mean '" + nearest_key(v, choices_) + "'?");
  }
}

std::string Field::to_text() const {
  switch (kind_) {
    case Kind::Int: return std::to_string(*static_cast<const int64_t*>(target_));
    case Kind::Float: return format_double(*static_cast<const double*>(target_));
    case Kind::Bool: return *static_cast<const bool*>(target_) ? "true" : "false";
    case Kind::String: {
      YAML::Emitter out;
      out << *static_cast<const std::string*>(target_);
      return out.c_str();
    }
    case Kind::StringList: {
      YAML::Emitter out;
      out << YAML::Flow << *static_cast<const std::vector<std::string>*>(target_);
      return out.c_str();
    }
    case Kind::IntList: {
      YAML::Emitter out;
      out << YAML::Flow << *static_cast<const std::vector<int64_t>*>(target_);
      return out.c_str();
    }
  }
  return "";
}

Field* Fields::find(const std::string& key) {
  for (auto& f : fields_)
    if (f.key() == key) return &f;
  return nullptr;
}

std::vector<std::string> Fields::keys() const {
  std::vector<std::string> k;
  for (const auto& f : fields_) k.push_back(f.key());
  return k;
}

void Fields::validate(const std::string& where) const {
  for (const auto& f : fields_) f.check(where + "." + f.key());
  for (const auto& v : validators_) v(where);
}

Fields& Schema::section(const std::string& name) {
  if (Fields* s = find_section(name)) return *s;
  sections_.emplace_back(name, Fields());
  return sections_.back().second;
}

Fields* Schema::find_section(const std::string& name) {
  for (auto& [n, f] : sections_)
    if (n == name) return &f;
  return nullptr;
}

void Schema::load_file(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    throw Error(path, std::filesystem::exists(path, ec) ? "is not a recipe file" : "recipe not found",
                "give the recipe's .yaml file");
  std::ifstream in(path);
  if (!in) throw Error(path, "cannot open recipe", "check the path");
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw Error(path, "cannot read recipe", "check the file");
  bool empty = false;
  try {
    empty = YAML::Load(ss.str()).IsNull();  // (blank, or comments only)
  } catch (const YAML::Exception&) {
    // (load_string reports it with its line)
  }
  if (empty)
    throw Error(path, "the recipe is empty", "a recipe holds sections: model:, tokenizer:, data:, train:, ...");
  load_string(ss.str(), path);
}

void Schema::load_string(const std::string& yaml, const std::string& source) {
  YAML::Node root;
  try {
    std::vector<YAML::Node> docs = YAML::LoadAll(yaml);
    while (docs.size() > 1 && docs.back().IsNull()) docs.pop_back();  // (a trailing '---' holds nothing)
    if (docs.size() > 1)  // (the later ones would be ignored)
      throw Error(source + ":" + std::to_string(docs[1].Mark().line + 1),
                  "a second YAML document starts here (after a '---' line)",
                  "a recipe is one document: remove the '---'");
    if (!docs.empty()) root = docs[0];
#ifdef LIBLLM_YAML_DEPTH_GUARD
  } catch (const YAML::DeepRecursion& e) {  // (yaml-cpp's own message is "bad file")
    throw Error(source + ":" + std::to_string(e.mark.line + 1),
                "invalid YAML: nested deeper than yaml-cpp reads (" + std::to_string(e.depth()) + " levels)",
                "a recipe's values are numbers, texts and short lists: the file is damaged");
#endif
  } catch (const YAML::Exception& e) {
    throw Error(source + ":" + std::to_string(e.mark.line + 1), "invalid YAML: " + e.msg);
  }
  if (root.IsNull()) return;
  if (!root.IsMap()) throw Error(source, "a recipe must be a mapping of sections (model:, tokenizer:, ...)");
  std::vector<std::string> names;
  for (const auto& [n, f] : sections_) names.push_back(n);
  std::map<std::string, int> first_line;  // section or section.key -> the line it was first given at
  auto once = [&](const std::string& name, const YAML::Node& key, const std::string& where) {
    const int line = key.Mark().line + 1;
    const auto [it, fresh] = first_line.emplace(name, line);
    if (!fresh)
      throw Error(where, "given twice (first at line " + std::to_string(it->second) + ")", "keep one of them");
  };
  for (const auto& kv : root) {
    if (!kv.first.IsScalar())
      throw Error(source + ":" + std::to_string(kv.first.Mark().line + 1), "a section name must be text");
    const std::string sec = kv.first.as<std::string>();
    Fields* fields = find_section(sec);
    const std::string at = source + ":" + std::to_string(kv.first.Mark().line + 1);
    if (!fields) throw Error(at, "unknown section '" + sec + "'", unknown_key_hint(sec, names));
    once(sec, kv.first, at + ": section '" + sec + "'");
    if (kv.second.IsNull()) continue;
    if (!kv.second.IsMap()) throw Error(at, "section '" + sec + "' must be a mapping of keys");
    for (const auto& item : kv.second) {
      if (!item.first.IsScalar())
        throw Error(source + ":" + std::to_string(item.first.Mark().line + 1) + ": " + sec, "a key must be text");
      const std::string key = item.first.as<std::string>();
      const std::string path = sec + "." + key;
      const std::string where = source + ":" + std::to_string(item.first.Mark().line + 1) + ": " + path;
      Field* f = fields->find(key);
      if (!f) throw Error(where, "unknown key", unknown_key_hint(key, fields->keys()));
      once(path, item.first, where);
      f->set_from_text(node_text(item.second, where, *f), where);
      mark_given(path);
    }
  }
}

void Schema::apply_override(const std::string& assignment) {
  const std::string where = "--set " + assignment;
  size_t eq = assignment.find('=');
  size_t dot = assignment.find('.');
  if (eq == std::string::npos || dot == std::string::npos || dot > eq)
    throw Error(where, "expected section.key=value", "e.g. --set model.n_layers=4");
  const std::string sec = assignment.substr(0, dot);
  const std::string key = assignment.substr(dot + 1, eq - dot - 1);
  std::vector<std::string> names;
  for (const auto& [n, f] : sections_) names.push_back(n);
  Fields* fields = find_section(sec);
  if (!fields) throw Error(where, "unknown section '" + sec + "'", unknown_key_hint(sec, names));
  Field* f = fields->find(key);
  if (!f) throw Error(where, "unknown key '" + sec + "." + key + "'", unknown_key_hint(key, fields->keys()));
  f->set_from_text(assignment.substr(eq + 1), where);
  mark_given(sec + "." + key);
}

void Schema::mark_given(const std::string& path) {
  if (std::find(given_.begin(), given_.end(), path) == given_.end()) given_.push_back(path);
}

void Schema::validate() const {
  for (const auto& [n, f] : sections_) f.validate(n);
}

std::string Schema::to_yaml() const {
  std::string out;
  for (auto& [name, fields] : sections_) {
    out += name + ":\n";
    for (auto& f : const_cast<Fields&>(fields).all()) out += "  " + f.key() + ": " + f.to_text() + "\n";
  }
  return out;
}

std::vector<std::string> recipe_differences(const std::string& before, const std::string& after) {
  const YAML::Node a = YAML::Load(before), b = YAML::Load(after);
  auto text = [](const YAML::Node& n) {
    if (!n.IsDefined() || n.IsNull()) return std::string("(none)");
    YAML::Emitter out;
    out << YAML::Flow << n;
    return std::string(out.c_str());
  };
  std::vector<std::string> out;
  std::vector<std::string> seen;
  auto compare = [&](const YAML::Node& x, const YAML::Node& y, bool y_first) {
    if (!y.IsMap()) return;
    for (const auto& section : y) {
      const std::string name = section.first.as<std::string>();
      const YAML::Node other = x.IsMap() ? x[name] : YAML::Node();
      if (!section.second.IsMap()) continue;
      for (const auto& kv : section.second) {
        const std::string key = name + "." + kv.first.as<std::string>();
        if (std::find(seen.begin(), seen.end(), key) != seen.end()) continue;
        seen.push_back(key);
        const std::string here = text(kv.second),
                          there = other.IsMap() ? text(other[kv.first.as<std::string>()]) : "(none)";
        if (here != there) out.push_back(key + ": " + (y_first ? there + " -> " + here : here + " -> " + there));
      }
    }
  };
  compare(a, b, true);   // after's keys
  compare(b, a, false);  // keys only before had
  return out;
}

}  // namespace libllm
