// Building elements and words. Ids, uris and metadata come from strangers: elements are built with
// textContent (through el()), never from HTML strings.

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.includes("-") || key === "role" || key === "title") node.setAttribute(key, value);
    else node[key] = value;
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// What to call a hit: its title in the metadata, else its file name, else its id.
export function label(hit) {
  const meta = hit.metadata || {};
  for (const key of ["title", "name", "caption"]) {
    if (typeof meta[key] === "string" && meta[key].trim()) return meta[key].trim();
  }
  const tail = String(hit.uri || "").split(/[/\\]/).pop().split("?")[0];
  return tail || hit.id;
}

export function ago(iso) {
  if (!iso) return "never";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 10) return "just now";
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 129600) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

export function when(iso) {
  return el("time", { dateTime: iso, title: iso ? new Date(iso).toLocaleString() : "" }, ago(iso));
}

export const count = (n, one, many = `${one}s`) => `${Number(n).toLocaleString()} ${n === 1 ? one : many}`;

// Show an image Blob (or File) in an <img>; the blob: URL is let go once the image is decoded.
export async function showBlob(img, blob) {
  const url = URL.createObjectURL(blob);
  img.src = url;
  try {
    await img.decode();
  } finally {
    URL.revokeObjectURL(url);
  }
}
