"""Our cffi binding of BoringSSL (out-of-line API mode, built by native/build_boringssl.py into
`proxy.tls._boringssl`): exactly the functions and constants the data path's TLS calls
(proxy/tls/openssl.py REQUIRED_FUNCTIONS), declared as BoringSSL's headers write them, plus the
settings OpenSSL's binding lacked (`SSL_CTX_set_num_tickets`), and `X509_NAME_print_ex`, which prints a
subject exactly as Envoy's x-forwarded-client-cert does. Where OpenSSL has a macro
(`SSL_CTX_set_options`, `BIO_get_mem_data`, `SSL_CTX_set_tlsext_servername_callback`, ...) BoringSSL
has a function, so every name here is a real call."""

SOURCE = """
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

/* A TLS 1.3 client's resumable session comes with the server's NewSessionTicket, after the
   handshake, and BoringSSL hands it only to a new-session callback (SSL_get1_session returns an
   unresumable placeholder). This callback keeps the newest one on its SSL (ex_data, freed with the
   SSL), and tm_take_new_session hands it over: no Python runs per ticket. */
static int tm_session_index = -1;

static void tm_free_session(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int index, long argl, void *argp) {
    SSL_SESSION_free((SSL_SESSION *)ptr);
}

static int tm_new_session(SSL *ssl, SSL_SESSION *session) {
    SSL_SESSION *old = (SSL_SESSION *)SSL_get_ex_data(ssl, tm_session_index);
    if (old != NULL) {
        SSL_SESSION_free(old);
    }
    if (!SSL_set_ex_data(ssl, tm_session_index, session)) {
        return 0; /* not taken: BoringSSL frees it */
    }
    return 1; /* taken */
}

int tm_keep_new_sessions(SSL_CTX *ctx) {
    if (tm_session_index < 0) {
        tm_session_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, tm_free_session);
        if (tm_session_index < 0) {
            return 0;
        }
    }
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL);
    SSL_CTX_sess_set_new_cb(ctx, tm_new_session);
    return 1;
}

SSL_SESSION *tm_take_new_session(SSL *ssl) {
    if (tm_session_index < 0) {
        return NULL;
    }
    SSL_SESSION *session = (SSL_SESSION *)SSL_get_ex_data(ssl, tm_session_index);
    SSL_set_ex_data(ssl, tm_session_index, NULL);
    return session;
}
"""

CDEF = """
typedef ... SSL_CTX;
typedef ... SSL;
typedef ... SSL_METHOD;
typedef ... SSL_SESSION;
typedef ... SSL_CIPHER;
typedef ... BIO;
typedef ... BIO_METHOD;
typedef ... X509;
typedef ... X509_STORE;
typedef ... X509_STORE_CTX;
typedef ... X509_VERIFY_PARAM;
typedef ... X509_NAME;
typedef int... ossl_ssize_t;
typedef int pem_password_cb(char *buf, int size, int rwflag, void *userdata);

#define SSL_TLSEXT_ERR_OK ...
#define SSL_TLSEXT_ERR_ALERT_FATAL ...
#define SSL_TLSEXT_ERR_NOACK ...
#define TLSEXT_NAMETYPE_host_name ...
#define SSL_VERIFY_NONE ...
#define SSL_VERIFY_PEER ...
#define SSL_VERIFY_FAIL_IF_NO_PEER_CERT ...
#define X509_V_OK ...
#define X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS ...
#define TLS1_2_VERSION ...
#define TLS1_3_VERSION ...
#define SSL_SESS_CACHE_OFF ...
#define SSL_SESS_CACHE_CLIENT ...
#define SSL_SESS_CACHE_SERVER ...
#define SSL_OP_ALL ...
#define SSL_OP_NO_COMPRESSION ...
#define SSL_OP_NO_RENEGOTIATION ...
#define SSL_OP_CIPHER_SERVER_PREFERENCE ...
#define SSL_OP_SINGLE_ECDH_USE ...
#define SSL_OP_NO_SSLv2 ...
#define SSL_OP_NO_SSLv3 ...
#define SSL_OP_NO_TICKET ...
#define SSL_MODE_RELEASE_BUFFERS ...
#define SSL_MODE_NO_AUTO_CHAIN ...
#define SSL_FILETYPE_PEM ...
#define SSL_ERROR_SSL ...
#define SSL_ERROR_WANT_READ ...
#define SSL_ERROR_SYSCALL ...
#define SSL_ERROR_ZERO_RETURN ...
#define OPENSSL_VERSION ...
#define XN_FLAG_RFC2253 ...

const SSL_METHOD *TLS_server_method(void);
const SSL_METHOD *TLS_client_method(void);
SSL_CTX *SSL_CTX_new(const SSL_METHOD *method);
void SSL_CTX_free(SSL_CTX *ctx);
uint32_t SSL_CTX_set_options(SSL_CTX *ctx, uint32_t options);
uint32_t SSL_CTX_set_mode(SSL_CTX *ctx, uint32_t mode);
int SSL_CTX_set1_curves_list(SSL_CTX *ctx, const char *curves);
int SSL_CTX_set_min_proto_version(SSL_CTX *ctx, uint16_t version);
int SSL_CTX_set_max_proto_version(SSL_CTX *ctx, uint16_t version);
int SSL_CTX_set_cipher_list(SSL_CTX *ctx, const char *str);
void SSL_CTX_set_alpn_select_cb(SSL_CTX *ctx, int (*cb)(SSL *ssl, const unsigned char **out, unsigned char *out_len,
                                const unsigned char *in, unsigned int in_len, void *arg), void *arg);
int SSL_CTX_set_alpn_protos(SSL_CTX *ctx, const unsigned char *protos, size_t protos_len);
void SSL_CTX_set_verify(SSL_CTX *ctx, int mode, int (*callback)(int ok, X509_STORE_CTX *store_ctx));
int SSL_CTX_set_session_cache_mode(SSL_CTX *ctx, int mode);
int SSL_CTX_set_session_id_context(SSL_CTX *ctx, const unsigned char *sid_ctx, size_t sid_ctx_len);
int SSL_CTX_set_tlsext_servername_callback(SSL_CTX *ctx, int (*callback)(SSL *ssl, int *out_alert, void *arg));
int SSL_CTX_set_num_tickets(SSL_CTX *ctx, size_t num_tickets);
int SSL_CTX_use_certificate_chain_file(SSL_CTX *ctx, const char *file);
int SSL_CTX_use_PrivateKey_file(SSL_CTX *ctx, const char *file, int type);
int SSL_CTX_check_private_key(const SSL_CTX *ctx);
int SSL_CTX_load_verify_locations(SSL_CTX *ctx, const char *ca_file, const char *ca_dir);
X509_STORE *SSL_CTX_get_cert_store(const SSL_CTX *ctx);
int X509_STORE_add_cert(X509_STORE *store, X509 *x509);
X509 *PEM_read_bio_X509(BIO *bp, X509 **x, pem_password_cb *cb, void *u);

SSL *SSL_new(SSL_CTX *ctx);
void SSL_free(SSL *ssl);
void SSL_set_bio(SSL *ssl, BIO *rbio, BIO *wbio);
void SSL_set_accept_state(SSL *ssl);
void SSL_set_connect_state(SSL *ssl);
int SSL_set_tlsext_host_name(SSL *ssl, const char *name);
X509_VERIFY_PARAM *SSL_get0_param(SSL *ssl);
int X509_VERIFY_PARAM_set1_host(X509_VERIFY_PARAM *param, const char *name, size_t name_len);
int X509_VERIFY_PARAM_set1_ip(X509_VERIFY_PARAM *param, const unsigned char *ip, size_t ip_len);
void X509_VERIFY_PARAM_set_hostflags(X509_VERIFY_PARAM *param, unsigned int flags);
int SSL_do_handshake(SSL *ssl);
int SSL_read(SSL *ssl, void *buf, int num);
int SSL_write(SSL *ssl, const void *buf, int num);
int SSL_pending(const SSL *ssl);
int SSL_shutdown(SSL *ssl);
int SSL_get_error(const SSL *ssl, int ret_code);
SSL_CTX *SSL_set_SSL_CTX(SSL *ssl, SSL_CTX *ctx);
void SSL_set_verify(SSL *ssl, int mode, int (*callback)(int ok, X509_STORE_CTX *store_ctx));
const char *SSL_get_servername(const SSL *ssl, const int type);
void SSL_get0_alpn_selected(const SSL *ssl, const unsigned char **out_data, unsigned int *out_len);
const char *SSL_get_version(const SSL *ssl);
int SSL_version(const SSL *ssl);
int SSL_get_verify_mode(const SSL *ssl);
long SSL_get_verify_result(const SSL *ssl);
X509 *SSL_get_peer_certificate(const SSL *ssl);
X509 *SSL_get_certificate(const SSL *ssl);
const SSL_CIPHER *SSL_get_current_cipher(const SSL *ssl);
const char *SSL_CIPHER_get_name(const SSL_CIPHER *cipher);
const char *SSL_get_cipher_list(const SSL *ssl, int n);
int SSL_session_reused(const SSL *ssl);
SSL_SESSION *SSL_get1_session(SSL *ssl);
int SSL_set_session(SSL *ssl, SSL_SESSION *session);
void SSL_SESSION_free(SSL_SESSION *session);

int i2d_X509_bio(BIO *bp, const X509 *x509);
X509_NAME *X509_get_subject_name(const X509 *x509);
int X509_NAME_print_ex(BIO *out, const X509_NAME *nm, int indent, unsigned long flags);
void X509_free(X509 *x509);
const char *X509_verify_cert_error_string(long err);

BIO *BIO_new(const BIO_METHOD *method);
const BIO_METHOD *BIO_s_mem(void);
BIO *BIO_new_mem_buf(const void *buf, ossl_ssize_t len);
int BIO_read(BIO *bio, void *data, int len);
int BIO_write(BIO *bio, const void *data, int len);
int BIO_free(BIO *bio);
long BIO_get_mem_data(BIO *bio, char **contents);
int BIO_set_mem_eof_return(BIO *bio, int eof_value);

uint32_t ERR_get_error(void);
const char *ERR_reason_error_string(uint32_t packed_error);
void ERR_clear_error(void);
const char *OpenSSL_version(int which);
unsigned long OpenSSL_version_num(void);

int tm_keep_new_sessions(SSL_CTX *ctx);
SSL_SESSION *tm_take_new_session(SSL *ssl);
"""
