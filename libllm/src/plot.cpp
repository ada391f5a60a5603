#include "libllm/plot.h"

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "atomic_file.h"
#include "libllm/error.h"

namespace libllm {
namespace {

using detail::write_file_atomic;

// Text for HTML/SVG: a run folder or label may hold <, > or &.
std::string escape(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == '<')
      out += "&lt;";
    else if (c == '>')
      out += "&gt;";
    else if (c == '&')
      out += "&amp;";
    else if (c == '\'')
      out += "&#39;";
    else
      out += c;
  }
  return out;
}

}  // namespace

std::string svg_chart(const std::string& y_label, const std::vector<PlotSeries>& series,
                      const std::vector<PlotBand>& bands, const std::vector<PlotMark>& marks, double W, double H) {
  const double L = 70, R = 20, T = 36, B = 46;
  double x0 = 0, x1 = 1, y0 = 1e300, y1 = -1e300;
  for (const auto& s : series)
    for (auto [x, y] : s.points)
      if (std::isfinite(y)) x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
  for (const auto& b : bands) x1 = std::max(x1, b.x1);
  if (y0 > y1) y0 = 0, y1 = 1;
  if (y1 - y0 < 1e-9) y1 = y0 + 1;
  auto px = [&](double x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
  auto py = [&](double y) { return H - B - (y - y0) / (y1 - y0) * (H - T - B); };
  std::string svg = fmt::format("<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif' font-size='12'>\n", W, H);
  for (const auto& b : bands)
    svg += fmt::format("<rect x='{:.1f}' y='{}' width='{:.1f}' height='{}' fill='{}' opacity='0.25'/>\n", px(b.x0 - 0.5), T,
                       std::max(2.0, px(b.x1 + 0.5) - px(b.x0 - 0.5)), H - T - B, b.color);
  svg += fmt::format("<rect x='{}' y='{}' width='{}' height='{}' fill='none' stroke='#999'/>\n", L, T, W - L - R, H - T - B);
  for (int i = 0; i <= 5; ++i) {
    const double y = y0 + (y1 - y0) * i / 5, x = x0 + (x1 - x0) * i / 5;
    svg += fmt::format("<text x='{}' y='{}' text-anchor='end'>{:.3g}</text>\n", L - 6, py(y) + 4, y);
    svg += fmt::format("<line x1='{}' x2='{}' y1='{}' y2='{}' stroke='#eee'/>\n", L, W - R, py(y), py(y));
    svg += fmt::format("<text x='{}' y='{}' text-anchor='middle'>{:.0f}</text>\n", px(x), H - B + 18, x);
  }
  double legend_x = L;
  for (const auto& s : series) {
    if (s.line) {
      std::string pts;
      for (auto [x, y] : s.points)
        if (std::isfinite(y)) pts += fmt::format("{:.1f},{:.1f} ", px(x), py(y));
      svg += fmt::format("<polyline fill='none' stroke='{}' stroke-width='1.5' points='{}'/>\n", s.color, pts);
    } else {
      for (auto [x, y] : s.points) {
        if (!std::isfinite(y)) continue;
        if (s.marker == "cross")
          svg += fmt::format("<path d='M{0:.1f},{1:.1f}l8,8m0,-8l-8,8' stroke='{2}' stroke-width='2'/>\n", px(x) - 4,
                             py(y) - 4, s.color);
        else
          svg += fmt::format("<circle cx='{:.1f}' cy='{:.1f}' r='4' fill='{}'/>\n", px(x), py(y), s.color);
      }
    }
    svg += fmt::format("<text x='{}' y='22' fill='{}'>{}{}</text>\n", legend_x, s.color,
                       s.line ? "&#9472; " : "&#9679; ", escape(s.label));
    legend_x += 40 + 7.0 * static_cast<double>(s.label.size());
  }
  for (const auto& m : marks) {
    svg += fmt::format("<line x1='{0:.1f}' x2='{0:.1f}' y1='{1}' y2='{2}' stroke='{3}' stroke-dasharray='4,3'/>\n", px(m.x), T,
                       H - B, m.color);
    svg += fmt::format("<text x='{:.1f}' y='{}' fill='{}'>{}</text>\n", px(m.x) + 3, T + 12, m.color, escape(m.label));
  }
  svg += fmt::format("<text x='{}' y='{}' text-anchor='middle'>optimizer step</text>\n", (W + L) / 2, H - 8);
  svg += fmt::format("<text x='14' y='{}' transform='rotate(-90 14 {})' text-anchor='middle'>{}</text>\n",
                     (H - B + T) / 2, (H - B + T) / 2, escape(y_label));
  return svg + "</svg>\n";
}

void write_html(const std::string& path, const std::string& title, const std::string& body) {
  const std::string t = escape(title);
  write_file_atomic(path, fmt::format("<!doctype html><html><head><meta charset='utf-8'><title>{0}</title></head>"
                                      "<body><h3>{0}</h3>\n{1}</body></html>\n",
                                      t, body));
}

void write_loss_plot(const std::string& metrics_jsonl, const std::string& html_path, const std::string& title) {
  PlotSeries train{"training loss (nats)", "#1f77b4"}, eval{"held-out loss", "#d62728"};
  eval.line = false;
  std::ifstream in(metrics_jsonl);
  if (!in) throw Error(metrics_jsonl, "cannot open metrics log");
  std::string line;
  while (std::getline(in, line)) {
    try {
      auto j = nlohmann::json::parse(line);
      const double step = j.at("step").get<double>();
      if (j.contains("loss") && j["loss"].is_number()) train.points.emplace_back(step, j["loss"].get<double>());
      if (j.contains("eval_loss") && j["eval_loss"].is_number())
        eval.points.emplace_back(step, j["eval_loss"].get<double>());
    } catch (const nlohmann::json::exception&) {
    }
  }
  const std::string body = svg_chart("loss", {train, eval}) +
                           fmt::format("<p>{} steps; final loss {:.4f}</p>", train.points.size(),
                                       train.points.empty() ? 0.0 : train.points.back().second);
  write_html(html_path, title, body);
}

}  // namespace libllm
