// Links libllm through find_package and runs a forward pass of the tiny recipe's model.
#include <libllm/model.h>
#include <libllm/recipe.h>

#include <iostream>

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const libllm::Recipe recipe = libllm::Recipe::load(argv[1]);
  libllm::Transformer model(recipe.model);
  int64_t n = 0;
  for (const auto& p : model->parameters()) n += p.numel();
  auto out = model->forward(torch::randint(0, recipe.model.vocab_size, {1, 8}));
  if (out.logits.sizes() != torch::IntArrayRef({1, 8, recipe.model.vocab_size})) return 1;
  std::cout << "consumer ok: " << n << " parameters\n";
  return n == libllm::count_parameters(recipe.model).total ? 0 : 1;
}
