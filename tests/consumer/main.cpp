// Links libllm through find_package, runs a forward pass of the tiny recipe's model and loads its
// tokenizer (libllm's sentencepiece module, found through the run path the package gives).
#include <libllm/model.h>
#include <libllm/recipe.h>
#include <libllm/tokenizer.h>

#include <iostream>

int main(int argc, char** argv) {
  if (argc != 3) return 2;  // RECIPE TOKENIZER
  const libllm::Recipe recipe = libllm::Recipe::load(argv[1]);
  libllm::Transformer model(recipe.model);
  int64_t n = 0;
  for (const auto& p : model->parameters()) n += p.numel();
  auto out = model->forward(torch::randint(0, recipe.model.vocab_size, {1, 8}));
  if (out.logits.sizes() != torch::IntArrayRef({1, 8, recipe.model.vocab_size})) return 1;
  const libllm::Tokenizer tok = libllm::Tokenizer::load(argv[2]);
  std::cout << "consumer ok: " << n << " parameters, " << tok.vocab_size() << " pieces, module "
            << libllm::sentencepiece_module_path() << "\n";
  return n == libllm::count_parameters(recipe.model).total ? 0 : 1;
}
