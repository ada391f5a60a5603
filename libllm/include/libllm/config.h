// Strict recipe fields. Each component owns a config struct and lists its fields once in
// `void fields(libllm::Fields& f)`; that list drives YAML reading (unknown keys, wrong types and
// out-of-range values are errors naming the file and key), `--set section.key=value` overrides,
// and printing the resolved config as YAML. YAML keys equal the C++ field names.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace libllm {

// One field of a config struct: a key bound to a member, plus its allowed values.
class Field {
 public:
  enum class Kind { Int, Float, Bool, String, StringList, IntList };

  Field(std::string key, Kind kind, void* target) : key_(std::move(key)), kind_(kind), target_(target) {}
  // Numeric bounds (inclusive). Apply to Int and Float fields and to each IntList element.
  Field& min(double lo) { min_ = lo; has_min_ = true; return *this; }
  Field& max(double hi) { max_ = hi; has_max_ = true; return *this; }
  // Allowed values of a String field.
  Field& one_of(std::vector<std::string> values) { choices_ = std::move(values); return *this; }

  const std::string& key() const { return key_; }
  Kind kind() const { return kind_; }
  // Sets the field from a YAML scalar text ("4", "1e-5", "true", "cosine", "[a, b]");
  // throws libllm::Error naming `where` and what is allowed.
  void set_from_text(const std::string& text, const std::string& where);
  // What the field accepts, e.g. "an integer >= 1" or "one of: cosine, linear".
  std::string allowed() const;
  // The current value as a YAML flow scalar/sequence.
  std::string to_text() const;
  // Checks the current value against bounds and choices.
  void check(const std::string& where) const;

 private:
  std::string key_;
  Kind kind_;
  void* target_;
  double min_ = 0, max_ = 0;
  bool has_min_ = false, has_max_ = false;
  std::vector<std::string> choices_;
};

// The fields of one config struct, in declaration order.
class Fields {
 public:
  Field& add(const std::string& key, int64_t& v) { return push(key, Field::Kind::Int, &v); }
  Field& add(const std::string& key, double& v) { return push(key, Field::Kind::Float, &v); }
  Field& add(const std::string& key, bool& v) { return push(key, Field::Kind::Bool, &v); }
  Field& add(const std::string& key, std::string& v) { return push(key, Field::Kind::String, &v); }
  Field& add(const std::string& key, std::vector<std::string>& v) {
    return push(key, Field::Kind::StringList, &v);
  }
  Field& add(const std::string& key, std::vector<int64_t>& v) { return push(key, Field::Kind::IntList, &v); }
  // A cross-field check run after loading and after overrides; throws libllm::Error.
  void validate_with(std::function<void(const std::string& where)> fn) { validators_.push_back(std::move(fn)); }

  Field* find(const std::string& key);
  std::vector<std::string> keys() const;
  std::deque<Field>& all() { return fields_; }
  void validate(const std::string& where) const;

 private:
  Field& push(const std::string& key, Field::Kind kind, void* target) {
    fields_.emplace_back(key, kind, target);
    return fields_.back();
  }
  std::deque<Field> fields_;
  std::vector<std::function<void(const std::string&)>> validators_;
};

// A whole recipe's schema: named sections, each the Fields of one config struct.
class Schema {
 public:
  Fields& section(const std::string& name);
  // Reads a YAML file strictly into the bound structs. Sections absent from the file keep
  // their defaults. Errors name the file, the key path and the nearest valid key.
  void load_file(const std::string& path);
  void load_string(const std::string& yaml, const std::string& source);
  // Applies "section.key=value" (the --set syntax).
  void apply_override(const std::string& assignment);
  // Runs every section's range checks and validators.
  void validate() const;
  // The resolved recipe as YAML (every key, defaults included).
  std::string to_yaml() const;
  // "section.key" of every key the YAML or an override set, in first-set order.
  const std::vector<std::string>& given() const { return given_; }

 private:
  std::vector<std::pair<std::string, Fields>> sections_;
  std::vector<std::string> given_;
  void mark_given(const std::string& path);
  Fields* find_section(const std::string& name);
};

// A whole decimal number, the only form recipes and command lines take ("4096", "-3", "+7";
// parse_number also "1e-5", "2.5", ".5"): nullopt for anything else (hex "0x10", "inf", "nan",
// "1_000", blanks, trailing text, out of range). parse_int also takes an integral value in float
// notation ("1e6", "4096.0").
std::optional<int64_t> parse_int(const std::string& text);
std::optional<double> parse_number(const std::string& text);

// The closest of `candidates` to `key` by edit distance ("" if none is reasonably close).
std::string nearest_key(const std::string& key, const std::vector<std::string>& candidates);

// How two resolved recipes (Schema::to_yaml texts) differ: "section.key: old -> new" for each key
// whose value differs, in `after`'s order; a key only one of them has reads "(none)" in the other.
std::vector<std::string> recipe_differences(const std::string& before, const std::string& after);

}  // namespace libllm
