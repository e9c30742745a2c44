/* The report's only script: filter by query id, and the paginated predictions table. */
(function () {
  "use strict";
  var PAGE = 50;
  var table = document.getElementById("pred-table");
  var source = document.getElementById("pred-data");
  var data = source ? JSON.parse(source.textContent) : [];
  var rows = data;
  var page = 0;
  var input = document.getElementById("filter");
  var status = document.getElementById("filter-status");

  function cell(tr, text, cls) {
    var td = document.createElement("td");
    td.textContent = text;
    if (cls) { td.className = cls; }
    tr.appendChild(td);
    return td;
  }

  function label(value) {
    var span = document.createElement("span");
    if (value === 1) { span.className = "badge copy"; span.textContent = "copy"; }
    else if (value === 0) { span.className = "badge noncopy"; span.textContent = "non-copy"; }
    return span;
  }

  function renderTable() {
    if (!table) { return; }
    var body = table.tBodies[0];
    var pages = Math.max(1, Math.ceil(rows.length / PAGE));
    page = Math.min(Math.max(page, 0), pages - 1);
    var start = page * PAGE;
    var shown = rows.slice(start, start + PAGE);
    var fragment = document.createDocumentFragment();
    shown.forEach(function (r) {
      var tr = document.createElement("tr");
      cell(tr, r[0]);
      cell(tr, r[1]);
      cell(tr, r[2].toFixed(4), "num");
      cell(tr, String(r[3]), "num");
      if (table.dataset.labels === "1") { cell(tr, "").appendChild(label(r[4])); }
      cell(tr, r[5]);
      fragment.appendChild(tr);
    });
    body.replaceChildren(fragment);
    document.getElementById("pred-page").textContent = rows.length
      ? "rows " + (start + 1) + "–" + (start + shown.length) + " of " + rows.length
      : "no row";
    document.getElementById("pred-prev").disabled = page === 0;
    document.getElementById("pred-next").disabled = page >= pages - 1;
  }

  function applyFilter() {
    var term = input.value.trim().toLowerCase();
    rows = term ? data.filter(function (r) { return r[0].toLowerCase().indexOf(term) >= 0; })
      : data;
    page = 0;
    renderTable();
    var items = document.querySelectorAll("[data-query]");
    var visible = 0;
    items.forEach(function (el) {
      var hide = term !== "" && el.dataset.query.toLowerCase().indexOf(term) < 0;
      el.hidden = hide;
      if (!hide && el.tagName === "ARTICLE") { visible += 1; }
    });
    status.textContent = term ? visible + " picture(s), " + rows.length + " prediction(s) match"
      : "";
  }

  if (table) {
    document.getElementById("pred-prev").addEventListener("click", function () {
      page -= 1; renderTable();
    });
    document.getElementById("pred-next").addEventListener("click", function () {
      page += 1; renderTable();
    });
  }
  input.addEventListener("input", applyFilter);
  var wanted = new URLSearchParams(window.location.search).get("q");
  if (wanted) { input.value = wanted; }
  applyFilter();
})();
