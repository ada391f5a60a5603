// libllm's one error type. Every failure a user can cause (a bad recipe key, a missing or
// corrupt file, a tokenizer that does not fit the model) is thrown as libllm::Error with the
// place (file, key or tensor), what is wrong, and a hint. Apps print what() on one line and
// exit non-zero.
#pragma once

#include <stdexcept>
#include <string>

namespace libllm {

class Error : public std::runtime_error {
 public:
  // where: the file, recipe key or tensor name; what: the problem; hint: how to fix it ("" = none).
  Error(const std::string& where, const std::string& what, const std::string& hint = "")
      : std::runtime_error(compose(where, what, hint)), where_(where), problem_(what), hint_(hint) {}
  const std::string& where() const { return where_; }
  const std::string& problem() const { return problem_; }  // `what` as given, without where and hint
  const std::string& hint() const { return hint_; }

 private:
  static std::string compose(const std::string& where, const std::string& what,
                             const std::string& hint) {
    std::string s = where.empty() ? what : where + ": " + what;
    if (!hint.empty()) s += " (hint: " + hint + ")";
    return s;
  }
  std::string where_, problem_, hint_;
};

// Thrown by the trainer when SIGTERM or SIGINT asked it to stop (a preemption, Ctrl-C), after it
// finished its step and saved a checkpoint; programs exit with 128 + signal(), as a process
// ended by that signal does.
class Interrupted : public Error {
 public:
  Interrupted(int signal, const std::string& where, const std::string& what, const std::string& hint = "")
      : Error(where, what, hint), signal_(signal) {}
  int signal() const { return signal_; }

 private:
  int signal_;
};

}  // namespace libllm
