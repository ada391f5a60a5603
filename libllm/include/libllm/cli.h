// What every libllm app shares: option parsing (--key value, --key=value, repeated --set),
// --help, and turning any failure into one "error: ..." line and a non-zero exit.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

namespace libllm::cli {

struct Option {
  std::string name;      // "--checkpoint"
  std::string help;      // one line
  bool takes_value = true;
  std::string fallback = "";  // default value ("" = none)
};

class Args {
 public:
  // Parses argv against `options` (plus --help, and repeated --set k=v for an app that reads a
  // recipe: recipe_overrides); n_positional arguments exactly, or at least -n_positional when < 0. Unknown options,
  // missing values and a value given to an on/off option (--chat=false) throw libllm::Error naming the option and the
  // nearest known one.
  Args(int argc, char** argv, std::string usage, std::vector<Option> options, int n_positional,
       bool recipe_overrides = false);
  bool help() const { return help_; }
  std::string usage() const;
  bool has(const std::string& name) const;
  std::string get(const std::string& name) const;  // the value or the option's fallback
  int64_t get_int(const std::string& name) const;
  double get_double(const std::string& name) const;
  const std::vector<std::string>& positional() const { return positional_; }
  const std::vector<std::string>& overrides() const { return sets_; }  // --set values in order

 private:
  std::string usage_;
  std::vector<Option> options_;
  std::map<std::string, std::string> values_;
  std::vector<std::string> positional_, sets_;
  bool help_ = false;
};

// Runs an app body: sets LibTorch's thread count from the machine, catches every exception and
// prints it as one line on stderr ("<prog>: error: ..."), returning 1; returns body's code otherwise.
int run(const char* prog, const std::function<int()>& body);

}  // namespace libllm::cli
