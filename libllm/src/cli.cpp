#include "libllm/cli.h"

#include <cstdio>

#include <c10/util/Exception.h>
#include <fmt/core.h>

#include <cmath>

#include <filesystem>

#include "libllm/compat.h"
#include "libllm/config.h"
#include "libllm/error.h"

namespace libllm::cli {

Args::Args(int argc, char** argv, std::string usage, std::vector<Option> options, int n_positional,
           bool recipe_overrides)
    : usage_(std::move(usage)), options_(std::move(options)) {
  if (recipe_overrides)
    options_.push_back({"--set", "override a recipe key, e.g. --set model.n_layers=4 (repeatable)", true});
  options_.push_back({"--help", "print this help", false});
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--") {  // (the end of the options: a recipe named "--x.yaml" or "-x.yaml" follows)
      for (++i; i < argc; ++i) positional_.push_back(argv[i]);
      break;
    }
    if (a.rfind("--", 0) != 0) {
      positional_.push_back(a);
      continue;
    }
    std::string name = a, value;
    bool inline_value = false;
    if (auto eq = a.find('='); eq != std::string::npos) name = a.substr(0, eq), value = a.substr(eq + 1), inline_value = true;
    const Option* opt = nullptr;
    for (const auto& o : options_)
      if (o.name == name) opt = &o;
    if (!opt) {
      std::vector<std::string> names;
      for (const auto& o : options_) names.push_back(o.name);
      const std::string near = nearest_key(name, names);
      throw Error("", "unknown option '" + name + "'", near.empty() ? "see --help" : "did you mean '" + near + "'?");
    }
    if (!opt->takes_value) {
      if (inline_value)
        throw Error("", "option " + name + " takes no value, got '" + value + "'", "write " + name + " alone");
      if (name == "--help") help_ = true;
      values_[name] = "true";
      continue;
    }
    if (!inline_value) {
      if (i + 1 >= argc) throw Error("", "option " + name + " needs a value", "see --help");
      value = argv[++i];
      // An option's name where its value should be: the value was forgotten (a value that
      // starts with one is given inline: --prompt=--chat).
      const std::string next_name = value.substr(0, value.find('='));
      for (const auto& o : options_)
        if (value.rfind("--", 0) == 0 && o.name == next_name)
          throw Error("", "option " + name + " needs a value, got the option " + value,
                      "give the value, or write " + name + "=" + value + " if it is meant as one");
    }
    if (name == "--set") {
      sets_.push_back(value);
    } else {
      if (values_.count(name))
        throw Error("", "option " + name + " given twice ('" + values_[name] + "' and '" + value + "')",
                    "give it once");
      values_[name] = value;
    }
  }
  const int given = static_cast<int>(positional_.size());
  if (!help_ && (n_positional >= 0 ? given != n_positional : given < -n_positional))
    throw Error("",
                "expected " +
                    (n_positional >= 0 ? std::to_string(n_positional) : "at least " + std::to_string(-n_positional)) +
                    " positional argument(s), got " + std::to_string(given),
                "usage: " + usage_);
}

std::string Args::usage() const {
  std::string s = "usage: " + usage_ + "\n\noptions:\n";
  for (const auto& o : options_) {
    std::string left = o.name + (o.takes_value ? " VALUE" : "");
    s += fmt::format("  {:<22} {}{}\n", left, o.help, o.fallback.empty() ? "" : " (default " + o.fallback + ")");
  }
  return s;
}

bool Args::has(const std::string& name) const { return values_.count(name) > 0; }

std::string Args::get(const std::string& name) const {
  if (auto it = values_.find(name); it != values_.end()) return it->second;
  for (const auto& o : options_)
    if (o.name == name) return o.fallback;
  return "";
}

int64_t Args::get_int(const std::string& name) const {
  const std::string v = get(name);
  if (const std::optional<int64_t> x = parse_int(v)) return *x;
  throw Error(name, "expected an integer, got '" + v + "'");
}

double Args::get_double(const std::string& name) const {
  const std::string v = get(name);
  if (const std::optional<double> x = parse_number(v)) return *x;
  throw Error(name, "expected a number, got '" + v + "'");
}

namespace {
std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }
}  // namespace

int run(const char* prog, const std::function<int()>& body) {
  try {
    compat::set_default_num_threads();
    return body();
  } catch (const Interrupted& e) {
    std::fflush(stdout);
    fmt::print(stderr, "{}: {}\n", prog, e.what());
    return 128 + e.signal();
  } catch (const Error& e) {
    std::fflush(stdout);  // (what was printed before it comes first in a log of both streams)
    fmt::print(stderr, "{}: error: {}\n", prog, e.what());
  } catch (const c10::Error& e) {
    std::fflush(stdout);
    fmt::print(stderr, "{}: error: {}\n", prog, first_line(e.what_without_backtrace()));
  } catch (const std::exception& e) {
    std::fflush(stdout);
    fmt::print(stderr, "{}: error: {}\n", prog, first_line(e.what()));
  }
  return 1;
}

}  // namespace libllm::cli
