// The page: the AI SDK's framework-free Chat (what useChat wraps) with relayd's ChatTransport.
// With React it is `useChat({ id, transport, resume: true })` with the same transport.
import { AbstractChat } from "ai";
import { RelaydChatTransport } from "@relayd/client/ai";

const $ = (id) => document.getElementById(id);
const chatId = sessionStorage.getItem("chat-id") ?? crypto.randomUUID();
sessionStorage.setItem("chat-id", chatId);

/** Chat state that re-renders the page, and keeps the finished turns across reloads. */
class PageState {
  status = "ready";
  error = undefined;
  messages = JSON.parse(sessionStorage.getItem(`messages:${chatId}`) ?? "[]");
  pushMessage = (m) => { this.messages = [...this.messages, m]; render(); };
  popMessage = () => { this.messages = this.messages.slice(0, -1); render(); };
  replaceMessage = (i, m) => { this.messages = this.messages.map((old, j) => (j === i ? m : old)); render(); };
  snapshot = (thing) => structuredClone(thing);
}

class Chat extends AbstractChat {
  constructor(init) { super({ ...init, state: new PageState() }); }
  setStatus(update) {
    super.setStatus(update);
    // Saved between answers only: a reload mid-answer gets the answer back from relayd (replayed).
    if (update.status !== "streaming") sessionStorage.setItem(`messages:${chatId}`, JSON.stringify(this.messages));
    render();
  }
}

const chat = (window.chat = new Chat({ id: chatId, transport: new RelaydChatTransport({ api: "/api/chat" }) }));

function render() {
  const chat = window.chat; // undefined while the Chat is being constructed
  if (!chat) return;
  $("status").textContent = chat.status;
  $("messages").replaceChildren(...chat.messages.map((m) => {
    const div = document.createElement("div");
    div.className = m.role;
    div.textContent = m.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
    return div;
  }));
}

$("form").onsubmit = (event) => {
  event.preventDefault();
  void chat.sendMessage({ text: $("prompt").value });
};
$("stop").onclick = () => void chat.stop();
render();
void chat.resumeStream(); // an answer still running (this tab reloaded mid-answer) is followed again
