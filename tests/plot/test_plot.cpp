// The loss plot: a self-contained page (inline SVG, no script) of the metrics log's finite losses.
#include "../catch_torch.h"

#include <filesystem>
#include <regex>

#include "../common.h"
#include "libllm/plot.h"

using namespace libllm;
namespace fs = std::filesystem;

TEST_CASE("the loss plot draws each finite loss once and the held-out points, escaped and written whole", "[plot]") {
  test::TempDir tmp;
  // Step 3's loss was not finite (logged as null) and its eval too; steps 2 and 5 were evaluated.
  test::write_file(tmp / "metrics.jsonl",
                   "{\"step\":1,\"loss\":5.5}\n{\"step\":2,\"loss\":5.0,\"eval_loss\":5.2}\n"
                   "{\"step\":3,\"loss\":null,\"eval_loss\":null}\n{\"step\":4,\"loss\":4.5}\n"
                   "{\"step\":5,\"loss\":4.25,\"eval_loss\":4.4}\n");
  const std::string html = tmp / "loss.html";
  write_loss_plot(tmp / "metrics.jsonl", html, "run <a&b>");
  const std::string page = test::read_file(html);
  CHECK(page.find("<script") == std::string::npos);
  CHECK(page.find("nan") == std::string::npos);
  CHECK(page.find("<title>run &lt;a&amp;b&gt;</title>") != std::string::npos);
  std::smatch m;
  REQUIRE(std::regex_search(page, m, std::regex("<polyline [^>]*points='([^']*)'")));
  const std::string pts = m[1];
  CHECK(std::count(pts.begin(), pts.end(), ',') == 4);  // steps 1, 2, 4, 5
  const std::string circles = "<circle ";
  size_t n = 0;
  for (size_t at = page.find(circles); at != std::string::npos; at = page.find(circles, at + 1)) ++n;
  CHECK(n == 2);  // held-out losses of steps 2 and 5
  CHECK(page.find("4 steps; final loss 4.2500") != std::string::npos);
  // Written whole under its name: no temporary file beside it.
  CHECK(std::distance(fs::directory_iterator(tmp.path), fs::directory_iterator()) == 2);
}
