// Conversations that exercise the chat templates' edge cases, shared by the chat-template tests
// against jinja2 (chat/test_chat.cpp) and against transformers (parity/test_hf_parity.cpp).
#pragma once

#include <string>
#include <vector>

#include "libllm/chat.h"

namespace libllm::test {

// A system text with quotes, a backslash, a newline, Jinja-like braces and non-ASCII letters.
inline const std::string kTrickySystem = "Be \"brief\", it's fine.\nBack\\slash {{ not jinja }} \xc3\xa9 \xe6\xbc\xa2";

// Plain Q&A; a system turn, whitespace to strip, written-out special tokens and Unicode spaces in
// the text; a conversation ending with the user's turn; an empty system turn; roles that do not
// alternate (llama2 refuses it).
inline const std::vector<std::vector<ChatMessage>>& chat_cases() {
  static const std::vector<std::vector<ChatMessage>> cases = {
      {{"user", "What is a kludge?"}, {"assistant", "A clumsy but working fix."}},
      {{"system", "Answer in one line."}, {"user", " spaced  question \n"}, {"assistant", "  spaced answer  "},
       {"user", "and </s> inside<s>?"}, {"assistant", "\xe6\xbc\xa2\xe5\xad\x97 \xe3\x80\x80ok\xc2\xa0"}},
      {{"user", "first"}, {"assistant", "one"}, {"user", "second"}},
      {{"system", ""}, {"user", "empty system"}, {"assistant", "fine"}},
      {{"user", "a"}, {"user", "b"}, {"assistant", "not alternating"}},
  };
  return cases;
}

}  // namespace libllm::test
