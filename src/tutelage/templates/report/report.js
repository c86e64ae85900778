// The report's browsers: kept tasks (search, split), rejected tasks (by reason, search) and the
// evaluation answers side by side (by set, search). The rows come from the page's JSON data
// block and are written into the page with textContent only: generated text is untrusted and
// never becomes markup. The page's Content-Security-Policy allows this one script and no other.
"use strict";
(function () {
  const PAGE = 25;  // rows shown at first and added by each "show more"
  const data = JSON.parse(document.getElementById("report-data").textContent);

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function field(parent, label, text) {
    if (text === undefined || text === null || text === "") return;
    parent.append(el("div", "label", label), el("pre", "text", text));
  }

  function score(value) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(3);
  }

  // One browser: a list, a search box, an optional select, a count and a "show more" button.
  // `rows` are plain objects; `text(row)` is what the search looks in; `keep(row, choice)` is the
  // select's test; `card(row)` renders one row.
  function browser(name, rows, { text, keep, card }) {
    const root = document.getElementById(name + "-browser");
    if (!root) return;
    const search = root.querySelector("input[type=search]");
    const select = root.querySelector("select");
    const count = root.querySelector(".count");
    const list = root.querySelector(".rows");
    const more = root.querySelector("button.more");
    const haystack = rows.map((row) => text(row).toLowerCase());
    let matches = [];
    let shown = 0;

    function showMore() {
      const end = Math.min(shown + PAGE, matches.length);
      for (; shown < end; shown++) list.append(card(rows[matches[shown]]));
      more.hidden = shown >= matches.length;
    }

    function update() {
      const words = search.value.toLowerCase().split(/\s+/).filter(Boolean);
      const choice = select ? select.value : "";
      matches = [];
      rows.forEach((row, i) => {
        if (choice && !keep(row, choice)) return;
        if (words.every((w) => haystack[i].includes(w))) matches.push(i);
      });
      list.replaceChildren();
      shown = 0;
      count.textContent = matches.length === rows.length
        ? `${rows.length.toLocaleString()} shown`
        : `${matches.length.toLocaleString()} of ${rows.length.toLocaleString()} match`;
      showMore();
    }

    search.addEventListener("input", update);
    if (select) select.addEventListener("change", update);
    more.addEventListener("click", showMore);
    root.hidden = false;
    update();
  }

  browser("kept", data.kept, {
    text: (r) => [r.instruction, r.input, r.output].join("\n"),
    keep: (r, split) => r.split === split,
    card: (r) => {
      const card = el("div", "card");
      card.append(el("span", "badge kept", "kept"));
      if (r.split) card.append(" ", el("span", "badge", r.split));
      if (r.to_seed !== null && r.to_seed !== undefined) {
        card.append(" ", el("span", "muted",
          `ROUGE-L ${score(r.to_seed)} to the nearest seed, ${score(r.to_kept)} to the nearest other kept task`));
      }
      field(card, "instruction", r.instruction);
      field(card, "input", r.input);
      field(card, "output", r.output);
      return card;
    },
  });

  browser("rejected", data.rejected, {
    text: (r) => [r.reason, r.instruction, r.input, r.output, r.raw].join("\n"),
    keep: (r, reason) => r.reason === reason,
    card: (r) => {
      const card = el("div", "card");
      card.append(el("span", "badge rejected", r.reason));
      if (r.nearest !== null && r.nearest !== undefined) {
        card.append(" ", el("span", "muted", `ROUGE-L ${score(r.nearest_score)} to a kept instruction`));
      }
      field(card, "instruction", r.instruction);
      field(card, "nearest kept instruction", r.nearest);
      field(card, "input", r.input);
      field(card, "output", r.output);
      field(card, "teacher text as written", r.raw);
      return card;
    },
  });

  const VERDICT = { A: "A", B: "B", tie: "tie" };
  browser("answers", data.answers, {
    text: (r) => [r.instruction, r.input, r.reference, ...r.answers.map((a) => a.answer)].join("\n"),
    keep: (r, set) => r.set === set,
    card: (r) => {
      const card = el("div", "card");
      card.append(el("span", "badge", r.set));
      field(card, "instruction", r.instruction);
      field(card, "input", r.input);
      const side = el("div", "side");
      if (r.reference !== null && r.reference !== undefined) {
        const cell = el("div");
        field(cell, "reference", r.reference);
        side.append(cell);
      }
      for (const a of r.answers) {
        const cell = el("div");
        const grade = r.grades.find((g) => g.role === a.role);
        let label = a.role;
        if (a.rouge_l !== null && a.rouge_l !== undefined) label += ` · ROUGE-L ${score(a.rouge_l)}`;
        if (a.ifeval) label += ` · constraints met ${a.ifeval.strict} of ${a.ifeval.n}`;
        if (grade) label += ` · grade ${grade.grade || "failed"}`;
        cell.append(el("div", "label", label), el("pre", "text", a.answer === null ? "" : a.answer));
        if (grade && grade.rationale) cell.append(el("div", "about", grade.rationale));
        side.append(cell);
      }
      card.append(side);
      for (const p of r.pairs) {
        const [first, second] = p.pair.split(":");
        const box = el("div", "judge");
        const outcome = p.score === null ? "the judge failed"
          : p.score > 0.5 ? `${first} preferred` : p.score < 0.5 ? `${second} preferred` : "tie";
        box.append(el("div", "label", `judge: ${first} vs ${second} · score ${score(p.score)} · ${outcome}`));
        for (const o of p.orders) {
          const shown = o.first_as === "A" ? `${first} as A, ${second} as B` : `${second} as A, ${first} as B`;
          const said = o.p_a !== null && o.p_a !== undefined
            ? `P(A) ${score(o.p_a)}, P(B) ${score(o.p_b)}`
            : o.verdict === null ? "no verdict" : `said ${VERDICT[o.verdict] || o.verdict}`;
          box.append(el("div", "about", `${shown}: ${said}. ${o.rationale || ""}`));
        }
        card.append(box);
      }
      return card;
    },
  });
})();
