// The job page follows its job live through the API's server-sent events (the session cookie
// authenticates the GET), and reloads once the job has finished to show its result.
"use strict";
(function () {
  var live = document.getElementById("live");
  if (!live || live.dataset.final === "yes" || !window.EventSource) { return; }
  var updates = 0;
  function set(id, text) { var el = document.getElementById(id); if (el) { el.textContent = text; } }
  function fmt(v) { return typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(3)) : String(v); }
  // DPAAT's per-sample radius histogram of the last epoch, redrawn as each epoch is recorded.
  function drawHistogram(hist) {
    var table = document.getElementById("live-hist");
    if (!table) { return; }
    var top = Math.max.apply(null, hist.counts.concat([1]));
    table.replaceChildren();
    hist.counts.forEach(function (count, i) {
      var row = table.insertRow();
      row.insertCell().textContent = fmt(hist.edges[i]) + "–" + fmt(hist.edges[i + 1]);
      var meter = document.createElement("meter");
      meter.min = 0; meter.max = top; meter.value = count;
      var cell = row.insertCell();
      cell.append(meter, " " + count);
    });
    document.getElementById("live-hist-section").hidden = false;
  }
  var source = new EventSource(live.dataset.events);
  source.addEventListener("job", function (event) {
    var job = JSON.parse(event.data);
    var p = job.progress || {};
    updates += 1;
    set("job-update-count", String(updates));
    var status = document.getElementById("job-status");
    status.textContent = job.status;
    status.className = "status s-" + job.status;
    set("job-phase", p.phase || (p.stage ? "evaluating: " + p.stage : ""));
    if (typeof p.fraction === "number") { document.getElementById("job-progress").value = p.fraction; }
    else if (p.epoch && p.steps_per_epoch) {
      var total = Number(live.dataset.epochs || 0);
      if (total) { document.getElementById("job-progress").value = (p.epoch - 1 + p.step / p.steps_per_epoch) / total; }
    }
    if (p.epoch) { set("job-where", "epoch " + p.epoch + ", step " + p.step + "/" + p.steps_per_epoch); }
    set("job-epochs", String(job.epochs_done));
    var metrics = Object.assign({}, p.metrics || {}, job.last_epoch || {});
    var dl = document.getElementById("job-metrics");
    dl.replaceChildren();
    Object.keys(metrics).forEach(function (k) {
      if (typeof metrics[k] !== "number") { return; }
      var dt = document.createElement("dt"); dt.textContent = k;
      var dd = document.createElement("dd"); dd.textContent = fmt(metrics[k]);
      dl.append(dt, dd);
    });
    var hist = (job.last_epoch || {}).eps_hist;
    if (hist && hist.counts) { drawHistogram(hist); }
    if (["succeeded", "failed", "cancelled"].indexOf(job.status) >= 0) {
      source.close();
      window.setTimeout(function () { window.location.reload(); }, 300);
    }
  });
  source.addEventListener("timeout", function () { source.close(); });
  source.addEventListener("gone", function () { source.close(); });
})();
