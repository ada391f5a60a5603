#include "libllm/recipe.h"

namespace libllm {

void Recipe::bind(Schema& s) {
  model.fields(s.section("model"));
  tokenizer.fields(s.section("tokenizer"));
  data_prep.fields(s.section("data_prep"));
  data.fields(s.section("data"));
  optim.fields(s.section("optim"));
  schedule.fields(s.section("schedule"));
  train.fields(s.section("train"));
  checkpoint.fields(s.section("checkpoint"));
  guard.fields(s.section("guard"));
  finetune.fields(s.section("finetune"));
  lora.fields(s.section("lora"));
  chat.fields(s.section("chat"));
}

namespace {
template <class LoadFn>
Recipe load_with(LoadFn&& load, const std::vector<std::string>& overrides) {
  Recipe r;
  Schema s;
  r.bind(s);
  load(s);
  for (const auto& o : overrides) s.apply_override(o);
  s.validate();
  r.model.resolve();
  r.given = s.given();
  return r;
}
}  // namespace

Recipe Recipe::load(const std::string& path, const std::vector<std::string>& overrides) {
  return load_with([&](Schema& s) { s.load_file(path); }, overrides);
}

Recipe Recipe::parse(const std::string& yaml, const std::string& source,
                     const std::vector<std::string>& overrides) {
  return load_with([&](Schema& s) { s.load_string(yaml, source); }, overrides);
}

std::string Recipe::to_yaml() const {
  Recipe copy = *this;
  Schema s;
  copy.bind(s);
  return s.to_yaml();
}

}  // namespace libllm
