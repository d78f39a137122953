// The mesh view: polls /api/graph and /api/proxies and draws the graph as SVG, one column per call depth.
"use strict";
const POLL_INTERVAL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const NODE_WIDTH = 140, NODE_HEIGHT = 36, COLUMN_GAP = 150, ROW_GAP = 60, MARGIN = 20;

function svg(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

function layout(nodes) {
  const columns = new Map();
  for (const node of nodes) {
    if (!columns.has(node.depth)) columns.set(node.depth, []);
    columns.get(node.depth).push(node);
  }
  const positions = new Map();
  let rows = 1;
  for (const [depth, column] of columns) {
    rows = Math.max(rows, column.length);
    column.forEach((node, row) => positions.set(node.id, {
      x: MARGIN + depth * (NODE_WIDTH + COLUMN_GAP), y: MARGIN + 20 + row * (NODE_HEIGHT + ROW_GAP)}));
  }
  const width = MARGIN * 2 + Math.max(1, columns.size) * (NODE_WIDTH + COLUMN_GAP);
  return {positions, width, height: MARGIN * 2 + 40 + rows * (NODE_HEIGHT + ROW_GAP)};
}

function edgeLabels(edge) {
  const p99 = edge.p99_ms === null ? "p99 –" : `p99 ${edge.p99_ms.toFixed(1)} ms`;
  return [`${edge.request_rate.toFixed(2)} rps · ${(edge.error_rate * 100).toFixed(1)}% 5xx`, p99];
}

function drawGraph(graph) {
  const {positions, width, height} = layout(graph.nodes);
  const root = document.getElementById("graph");
  root.setAttribute("width", Math.max(width, 600));
  root.setAttribute("height", Math.max(height, 200));
  const edges = document.getElementById("edges"), nodes = document.getElementById("nodes");
  edges.replaceChildren();
  nodes.replaceChildren();
  for (const node of graph.nodes) {
    const at = positions.get(node.id);
    const group = svg("g", {class: node.workload === "unknown" ? "node unknown" : "node", "data-id": node.id,
                            transform: `translate(${at.x},${at.y})`});
    group.append(svg("rect", {width: NODE_WIDTH, height: NODE_HEIGHT, rx: 6}),
                 svg("text", {x: NODE_WIDTH / 2, y: 15}, node.workload),
                 svg("text", {x: NODE_WIDTH / 2, y: 29, class: "namespace"}, node.namespace));
    nodes.append(group);
  }
  graph.edges.forEach((edge, index) => {
    const from = positions.get(edge.source), to = positions.get(edge.destination);
    if (!from || !to) return;
    const x1 = from.x + NODE_WIDTH, y1 = from.y + NODE_HEIGHT / 2, x2 = to.x, y2 = to.y + NODE_HEIGHT / 2;
    const classes = ["edge"];
    if (edge.error_rate > 0) classes.push("errors");
    if (edge.request_rate === 0) classes.push("idle");
    const group = svg("g", {class: classes.join(" "), "data-source": edge.source, "data-destination": edge.destination,
                            "data-service": edge.destination_service, "data-rate": edge.request_rate,
                            "data-error-rate": edge.error_rate, "data-p99-ms": edge.p99_ms ?? "",
                            "data-mtls": edge.mtls === null ? "unknown" : String(edge.mtls)});
    const middle = (x1 + x2) / 2;
    group.append(svg("path", {d: `M ${x1} ${y1} C ${middle} ${y1}, ${middle} ${y2}, ${x2} ${y2}`, "marker-end": "url(#arrow)"}));
    // labels stacked at the curve's middle, above it for a straight edge
    const labelY = (y1 + y2) / 2 - (y1 === y2 ? 34 : 10);
    edgeLabels(edge).forEach((line, row) =>
      group.append(svg("text", {x: middle, y: labelY + row * 12, class: "metrics"}, line)));
    if (edge.mtls !== null) {
      group.append(svg("text", {x: middle, y: labelY + 24, class: edge.mtls ? "mtls" : "plain"},
                       edge.mtls ? "mTLS" : "plaintext"));
    }
    edges.append(group);
  });
  document.getElementById("window").textContent = `(last ${graph.window_s} s, replica ${graph.replica})`;
}

function drawProxies(status) {
  const body = document.querySelector("#proxies tbody");
  body.replaceChildren();
  for (const proxy of status.proxies) {
    const row = document.createElement("tr");
    row.className = "proxy";
    row.dataset.nodeId = proxy.node_id;
    const cells = [proxy.node_id, proxy.connected ? "yes" : "no", proxy.sent_version, proxy.acked_version,
                   proxy.last_nack ? `${proxy.last_nack_version}: ${proxy.last_nack}` : "", proxy.replica];
    cells.forEach((text, index) => {
      const cell = document.createElement("td");
      if (index === 4) cell.className = "nack";
      cell.textContent = text;
      row.append(cell);
    });
    body.append(row);
  }
  document.getElementById("config-version").textContent = `(config version ${status.config_version})`;
}

async function refresh() {
  try {
    const [graph, proxies] = await Promise.all(["api/graph", "api/proxies"].map(
      path => fetch(path, {cache: "no-store"}).then(response => response.json())));
    drawGraph(graph);
    drawProxies(proxies);
    document.getElementById("meta").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    document.getElementById("meta").textContent = `refresh failed: ${error}`;
  }
}

refresh();
setInterval(refresh, POLL_INTERVAL_MS);
