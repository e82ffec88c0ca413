// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	smithyhttp "github.com/aws/smithy-go/transport/http"
)

// s3Params are the parameters of Nix's s3:// store URLs.
var s3Params = []string{"region", "endpoint", "profile", "scheme"}

// s3DefaultRegion is Nix's.
const s3DefaultRegion = "us-east-1"

// S3Cache is a binary cache in an S3 bucket, as `nix copy --to s3://bucket` writes it, on AWS or
// on an S3-compatible server (endpoint=, path-style addressing). Requests are signed with SigV4
// with credentials from the standard AWS chain (environment, shared files, web identity,
// container and instance roles), the plugin config's aws_credentials_file first among the files.
type S3Cache struct {
	name   string
	bucket string
	client *s3.Client
	param  CacheParams

	mu sync.Mutex
	// transport is the HTTP transport the SDK built, once it built one.
	transport *http.Transport
}

func checkS3URL(u *url.URL) error {
	switch {
	case u.Host == "":
		return errors.New("has no bucket: write s3://BUCKET")
	case u.Path != "" && u.Path != "/":
		return fmt.Errorf("has a path %q: an s3:// cache is a whole bucket, s3://BUCKET", u.Path)
	}
	q := u.Query()
	if s := q.Get("scheme"); s != "" && s != "http" && s != "https" {
		return fmt.Errorf("scheme=%q must be http or https", s)
	}
	if e := q.Get("endpoint"); e != "" {
		if _, err := s3Endpoint(e, q.Get("scheme")); err != nil {
			return err
		}
	}
	return nil
}

// s3Endpoint makes the endpoint URL from endpoint= (host[:port] or a URL) and scheme=.
func s3Endpoint(endpoint, scheme string) (string, error) {
	if !strings.Contains(endpoint, "://") {
		if scheme == "" {
			scheme = "https"
		}
		endpoint = scheme + "://" + endpoint
	}
	e, err := url.Parse(endpoint)
	if err != nil || e.Host == "" || (e.Scheme != "http" && e.Scheme != "https") || e.User != nil {
		return "", fmt.Errorf("endpoint=%q must be a host[:port] or an http(s) URL of an S3-compatible server", endpoint)
	}
	if scheme != "" {
		e.Scheme = scheme
	}
	return e.String(), nil
}

func openS3Cache(c CacheURL, cfg CacheConfig) (Source, error) {
	q := c.u.Query()
	region := q.Get("region")
	if region == "" {
		region = s3DefaultRegion
	}
	cache := &S3Cache{name: c.Identity(), bucket: c.u.Host, param: c.params}
	// The SDK's own client, so that AWS_CA_BUNDLE still applies; Close ends its idle connections.
	httpClient := awshttp.NewBuildableClient().WithTransportOptions(func(t *http.Transport) {
		if cfg.Connections > 0 {
			t.MaxIdleConnsPerHost = cfg.Connections
			t.MaxConnsPerHost = cfg.Connections
		}
		cache.mu.Lock()
		cache.transport = t
		cache.mu.Unlock()
	})
	opts := []func(*config.LoadOptions) error{config.WithRegion(region), config.WithHTTPClient(httpClient)}
	if p := q.Get("profile"); p != "" {
		opts = append(opts, config.WithSharedConfigProfile(p))
	}
	if cfg.AWSCredentialsFile != "" {
		opts = append(opts, config.WithSharedCredentialsFiles([]string{cfg.AWSCredentialsFile}))
	}
	// Loading reads the environment and the shared files only; credentials are fetched when the
	// first request is signed.
	awsCfg, err := config.LoadDefaultConfig(context.Background(), opts...)
	if err != nil {
		return nil, fmt.Errorf("%s: AWS configuration: %w", c.Identity(), err)
	}
	var endpoint string
	if e := q.Get("endpoint"); e != "" {
		if endpoint, err = s3Endpoint(e, q.Get("scheme")); err != nil {
			return nil, err
		}
	}
	cache.client = s3.NewFromConfig(awsCfg, func(o *s3.Options) {
		if endpoint != "" {
			o.BaseEndpoint = aws.String(endpoint)
			o.UsePathStyle = true
		}
		// The importer checks every NAR against its narinfo's hashes.
		o.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
		o.DisableLogOutputChecksumValidationSkipped = true
	})
	return cache, nil
}

func (c *S3Cache) String() string { return c.name }

func (c *S3Cache) Retryable() bool { return true }

func (c *S3Cache) params() CacheParams { return c.param }

// Close ends the cache's idle connections.
func (c *S3Cache) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.transport != nil {
		c.transport.CloseIdleConnections()
	}
	return nil
}

func (c *S3Cache) Open(ctx context.Context, rel string) (io.ReadCloser, error) {
	return c.get(ctx, rel, 0)
}

func (c *S3Cache) OpenFrom(ctx context.Context, rel string, offset int64) (io.ReadCloser, error) {
	return c.get(ctx, rel, offset)
}

func (c *S3Cache) get(ctx context.Context, key string, offset int64) (io.ReadCloser, error) {
	in := &s3.GetObjectInput{Bucket: aws.String(c.bucket), Key: aws.String(key)}
	if offset > 0 {
		in.Range = aws.String("bytes=" + strconv.FormatInt(offset, 10) + "-")
	}
	out, err := c.client.GetObject(ctx, in)
	if err != nil {
		var nsk *types.NoSuchKey
		var re *smithyhttp.ResponseError
		if errors.As(err, &nsk) || (errors.As(err, &re) && re.HTTPStatusCode() == http.StatusNotFound) {
			return nil, ErrNotFound
		}
		return nil, fmt.Errorf("GET %s: %w", key, err)
	}
	if offset > 0 && (out.ContentRange == nil || !strings.HasPrefix(*out.ContentRange, "bytes "+strconv.FormatInt(offset, 10)+"-")) {
		out.Body.Close()
		return nil, errNoResume
	}
	return out.Body, nil
}
