#include "libllm/plot.h"

#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "libllm/error.h"

namespace libllm {

void write_loss_plot(const std::string& metrics_jsonl, const std::string& html_path, const std::string& title) {
  std::vector<std::pair<double, double>> train, eval;
  std::ifstream in(metrics_jsonl);
  if (!in) throw Error(metrics_jsonl, "cannot open metrics log");
  std::string line;
  while (std::getline(in, line)) {
    try {
      auto j = nlohmann::json::parse(line);
      const double step = j.at("step").get<double>();
      if (j.contains("loss") && j["loss"].is_number() && std::isfinite(j["loss"].get<double>()))
        train.emplace_back(step, j["loss"].get<double>());
      if (j.contains("eval_loss")) eval.emplace_back(step, j["eval_loss"].get<double>());
    } catch (const nlohmann::json::exception&) {
    }
  }
  const double W = 900, H = 420, L = 60, R = 20, T = 40, B = 50;
  double x0 = 0, x1 = 1, y0 = 1e300, y1 = -1e300;
  for (const auto* series : {&train, &eval})
    for (auto [x, y] : *series) x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
  if (y0 > y1) y0 = 0, y1 = 1;
  if (y1 - y0 < 1e-9) y1 = y0 + 1;
  auto px = [&](double x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
  auto py = [&](double y) { return H - B - (y - y0) / (y1 - y0) * (H - T - B); };
  std::string svg = fmt::format("<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif' font-size='12'>\n", W, H);
  svg += fmt::format("<rect x='{}' y='{}' width='{}' height='{}' fill='none' stroke='#999'/>\n", L, T, W - L - R, H - T - B);
  for (int i = 0; i <= 5; ++i) {
    const double y = y0 + (y1 - y0) * i / 5, x = x0 + (x1 - x0) * i / 5;
    svg += fmt::format("<text x='{}' y='{}' text-anchor='end'>{:.3f}</text>\n", L - 6, py(y) + 4, y);
    svg += fmt::format("<line x1='{}' x2='{}' y1='{}' y2='{}' stroke='#eee'/>\n", L, W - R, py(y), py(y));
    svg += fmt::format("<text x='{}' y='{}' text-anchor='middle'>{:.0f}</text>\n", px(x), H - B + 18, x);
  }
  std::string pts;
  for (auto [x, y] : train) pts += fmt::format("{:.1f},{:.1f} ", px(x), py(y));
  svg += fmt::format("<polyline fill='none' stroke='#1f77b4' stroke-width='1.5' points='{}'/>\n", pts);
  for (auto [x, y] : eval) svg += fmt::format("<circle cx='{:.1f}' cy='{:.1f}' r='4' fill='#d62728'/>\n", px(x), py(y));
  svg += fmt::format("<text x='{}' y='{}' text-anchor='middle'>optimizer step</text>\n", (W + L) / 2, H - 12);
  svg += fmt::format("<text x='{}' y='24' fill='#1f77b4'>training loss (nats)</text><text x='{}' y='24' fill='#d62728'>&#9679; held-out loss</text>\n", L, L + 180);
  svg += "</svg>\n";
  const std::string html = fmt::format("<!doctype html><html><head><meta charset='utf-8'><title>{0}</title></head>"
                                       "<body><h3>{0}</h3>\n{1}<p>{2} steps; final loss {3:.4f}</p></body></html>\n",
                                       title, svg, train.size(), train.empty() ? 0.0 : train.back().second);
  const std::string tmp = html_path + ".tmp-" + std::to_string(::getpid());
  std::ofstream(tmp) << html;
  if (std::rename(tmp.c_str(), html_path.c_str()) != 0) throw Error(html_path, "cannot write plot");
}

}  // namespace libllm
