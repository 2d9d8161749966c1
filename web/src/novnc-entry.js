// Entry point bundled by scripts/build-web.sh into public/vendor/novnc.js:
// the real noVNC client (RFB) from npm as one ES module.
import RFB from "@novnc/novnc";
export default RFB;
