import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import java.io.IOException;
import java.io.OutputStream;
import java.net.InetAddress;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Comparator;
import java.util.logging.Handler;
import java.util.logging.Level;
import java.util.logging.Logger;
import java.util.stream.Stream;
import org.apache.catalina.Context;
import org.apache.catalina.LifecycleState;
import org.apache.catalina.connector.Connector;
import org.apache.catalina.startup.Tomcat;
import org.apache.coyote.http11.Http11NioProtocol;

/**
 * Embedded Tomcat 11 on 127.0.0.1:PORT, NIO connector, keepAliveTimeout = connectionTimeout =
 * KEEPALIVE_MS, unlimited requests per connection. GET/POST/PUT on / and /healthz answer 200;
 * any other path gets Tomcat's own 404. Tomcat's Host-header validation is left as shipped.
 *
 * Usage: java -cp 'DIR/*' TomcatMain PORT KEEPALIVE_MS
 */
public final class TomcatMain {
    private static final byte[] BODY = "ok\n".getBytes(StandardCharsets.US_ASCII);
    /** Held so the level set on it is not lost when the logger is garbage-collected. */
    private static final Logger ROOT_LOGGER = Logger.getLogger("");

    private static final class Ok extends HttpServlet {
        private static final long serialVersionUID = 1L;

        private void answer(HttpServletRequest req, HttpServletResponse resp) throws IOException {
            req.getInputStream().transferTo(OutputStream.nullOutputStream());
            resp.setStatus(200);
            resp.setContentType("text/plain");
            resp.setContentLength(BODY.length);
            resp.getOutputStream().write(BODY);
        }

        @Override
        protected void doGet(HttpServletRequest req, HttpServletResponse resp) throws IOException {
            answer(req, resp);
        }

        @Override
        protected void doPost(HttpServletRequest req, HttpServletResponse resp) throws IOException {
            answer(req, resp);
        }

        @Override
        protected void doPut(HttpServletRequest req, HttpServletResponse resp) throws IOException {
            answer(req, resp);
        }
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 2) {
            System.err.println("usage: TomcatMain PORT KEEPALIVE_MS");
            System.exit(2);
        }
        int port = Integer.parseInt(args[0]);
        int keepAliveMs = Integer.parseInt(args[1]);

        ROOT_LOGGER.setLevel(Level.WARNING);
        for (Handler handler : ROOT_LOGGER.getHandlers()) {
            handler.setLevel(Level.WARNING);
        }

        Path base = Files.createTempDirectory("tuner-tomcat-");
        Tomcat tomcat = new Tomcat();
        tomcat.setBaseDir(base.toString());

        Connector connector = new Connector(Http11NioProtocol.class.getName());
        Http11NioProtocol protocol = (Http11NioProtocol) connector.getProtocolHandler();
        connector.setPort(port);
        protocol.setAddress(InetAddress.getByName("127.0.0.1"));
        protocol.setKeepAliveTimeout(keepAliveMs);
        protocol.setConnectionTimeout(keepAliveMs);
        protocol.setMaxKeepAliveRequests(-1);
        tomcat.setConnector(connector);

        Context context = tomcat.addContext("", null);
        Tomcat.addServlet(context, "ok", new Ok());
        context.addServletMappingDecoded("", "ok");  // exactly the context root, "/"
        context.addServletMappingDecoded("/healthz", "ok");

        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                tomcat.stop();
                tomcat.destroy();
            } catch (Exception ignored) {
                // exiting anyway
            }
            deleteTree(base);
        }));

        try {
            tomcat.start();
        } catch (Exception exc) {
            System.err.println("TomcatMain: Tomcat did not start on 127.0.0.1:" + port + ": " + exc);
            System.exit(1);
        }
        if (connector.getState() != LifecycleState.STARTED) {
            System.err.println("TomcatMain: the connector on 127.0.0.1:" + port
                    + " did not start (state " + connector.getState() + "); is the port taken?");
            System.exit(1);
        }
        tomcat.getServer().await();
    }

    private static void deleteTree(Path root) {
        try (Stream<Path> paths = Files.walk(root)) {
            paths.sorted(Comparator.reverseOrder()).forEach(p -> p.toFile().delete());
        } catch (IOException ignored) {
            // a temporary directory left behind is harmless
        }
    }
}
