// Self-contained HTML plots (inline SVG, no scripts or network) of training metrics.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace libllm {

// Reads a metrics.jsonl (lines with "step", "loss", optional "eval_loss") and writes an HTML page
// with the training loss curve and held-out evaluation points. Written to a temporary name and renamed.
void write_loss_plot(const std::string& metrics_jsonl, const std::string& html_path, const std::string& title);

// Building blocks for other plots.
struct PlotSeries {
  std::string label, color;
  std::vector<std::pair<double, double>> points;  // (x, y); non-finite y are left out
  bool line = true;                               // polyline, else markers
  std::string marker = "circle";                  // circle | cross (when line = false)
};
struct PlotBand {  // a shaded x range
  double x0 = 0, x1 = 0;
  std::string color;
};
struct PlotMark {  // a dashed vertical line with a label
  double x = 0;
  std::string label, color;
};
// One SVG chart (x: optimizer step) of the series, bands and marks.
std::string svg_chart(const std::string& y_label, const std::vector<PlotSeries>& series,
                      const std::vector<PlotBand>& bands = {}, const std::vector<PlotMark>& marks = {},
                      double width = 900, double height = 360);
// Writes <html> with `title` and `body` to path (temporary name, then rename).
void write_html(const std::string& path, const std::string& title, const std::string& body);

}  // namespace libllm
